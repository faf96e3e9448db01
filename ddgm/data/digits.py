"""The bundled dataset: scikit-learn's 8x8 digits (levels 0..16) with the fixed reference split 1000/350/447.

Its images ship inside scikit-learn, so there is no input folder for DVC to track: the ``data.path``
of the digits source names this module instead (``DIGITS_PATH``), the code that defines the data.
"""

from __future__ import annotations

import io

import numpy as np

from ddgm.data.raw_inputs import ContentHasher, RawInputs
from ddgm.data.source_data import SourceData

DIGITS_PATH = "ddgm/data/digits.py"
DIGITS_LOCATION = "sklearn digits"
DIGITS_LEVELS = 17
DIGITS_SPLIT_SIZES = {"train": 1000, "val": 350}  # the rest (447) is the test split


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_digits_source() -> SourceData:
    """All 1797 digits in scikit-learn's order, their labels and the fixed split; the content hash
    covers the images and labels as .npy bytes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    n_train, n_val = DIGITS_SPLIT_SIZES["train"], DIGITS_SPLIT_SIZES["val"]
    splits = {
        "train": np.arange(0, n_train),
        "val": np.arange(n_train, n_train + n_val),
        "test": np.arange(n_train + n_val, len(images)),
    }
    hasher = ContentHasher()
    hasher.add("images.npy", _npy_bytes(images))
    hasher.add("labels.npy", _npy_bytes(labels))
    return SourceData(
        images=images,
        labels=labels,
        num_levels=DIGITS_LEVELS,
        class_names=[str(name) for name in digits.target_names],
        fixed_splits=splits,
        raw=RawInputs(location=DIGITS_LOCATION, sha256=hasher.hexdigest(), files_read=len(hasher)),
    )
