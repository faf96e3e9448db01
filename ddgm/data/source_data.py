"""A whole dataset in memory, as a source reader returns it (before splitting and sharding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ddgm.data.raw_inputs import RawInputs


@dataclass
class SourceData:
    """A whole dataset in memory, before splitting and sharding."""

    images: np.ndarray  # uint8 levels in 0..num_levels-1, shape (N, C, H, W)
    labels: np.ndarray  # int64 (N,), -1 where there is no label
    num_levels: int
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # bad inputs left out (skip_bad)
    fixed_splits: dict[str, np.ndarray] | None = None  # predefined split indices, if the source has them
    raw: RawInputs | None = None  # content hash of the input files, and which were read/skipped/ignored

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, channels, height, width = self.images.shape
        return int(channels), int(height), int(width)
