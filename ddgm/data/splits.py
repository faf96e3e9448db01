"""Seeded train/val/test split of a dataset's indices."""

from __future__ import annotations

import numpy as np

from ddgm.data.errors import DataError

SPLITS = ("train", "val", "test")


def random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices for each split: round(n * fraction) for val and test, the rest for train.

    Indices stay in random order, so shards of a class-sorted source (an image folder) mix classes.
    """
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(
            f"{n} images leave no training images with data.val_fraction={val_fraction} and "
            f"data.test_fraction={test_fraction}; expected at least 1"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return {
        "train": perm[:n_train],
        "val": perm[n_train : n_train + n_val],
        "test": perm[n_train + n_val :],
    }
