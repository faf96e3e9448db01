"""The ``data:`` section of params.yaml: defaults and validation (the pipeline reads the file)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ddgm.data.digits import DIGITS_PATH
from ddgm.data.errors import DataError

SOURCES = ("digits", "folder", "array")


@dataclass
class DataParams:
    """Validated data-preparation parameters (see params.yaml, section ``data``)."""

    source: str = "digits"
    path: str | None = DIGITS_PATH
    image_size: int | None = None
    channels: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    samples_per_shard: int = 128
    skip_bad: bool = False
    out_dir: str = "data/shards"

    def __post_init__(self) -> None:
        _validate(self)

    def source_record(self) -> dict[str, Any]:
        """The parameters that determine the dataset content (stored in the manifest)."""
        record = dataclasses.asdict(self)
        del record["out_dir"], record["samples_per_shard"]
        if self.source == "digits":
            record["path"] = None  # DIGITS_PATH only names what DVC tracks; the data is the same either way
        return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(p: DataParams) -> None:
    if p.source not in SOURCES:
        raise DataError(f"data.source must be one of {SOURCES}, found {p.source!r}")
    if p.source == "digits":
        if p.path not in (None, DIGITS_PATH):
            raise DataError(
                f"data.path is not used by source 'digits'; found {p.path!r}, expected {DIGITS_PATH} "
                f"(the module DVC tracks for it) or null; for your own images set data.source to folder or array"
            )
        for name in ("image_size", "channels"):
            if getattr(p, name) is not None:
                raise DataError(
                    f"data.{name} is not used by source 'digits'; found {getattr(p, name)!r}, expected null"
                )
    elif not isinstance(p.path, str) or not p.path or p.path == DIGITS_PATH:
        raise DataError(f"data.path must name the input for source {p.source!r} (an image folder or .npz/.npy "
                        f"file), found {p.path!r}")
    if p.source == "array":
        for name in ("image_size", "channels"):
            if getattr(p, name) is not None:
                raise DataError(
                    f"data.{name} is only used by source 'folder'; found {getattr(p, name)!r}, expected null"
                )
    if p.image_size is not None and not (_is_int(p.image_size) and p.image_size >= 1):
        raise DataError(f"data.image_size must be null or an integer >= 1, found {p.image_size!r}")
    if p.channels is not None and p.channels not in (1, 3):
        raise DataError(f"data.channels must be null, 1 or 3, found {p.channels!r}")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise DataError(f"data.{name} must be a number in [0, 1), found {value!r}")
    if p.val_fraction + p.test_fraction >= 1.0:
        raise DataError(
            f"data.val_fraction + data.test_fraction must be < 1 to leave training data, "
            f"found {p.val_fraction} + {p.test_fraction}"
        )
    if not _is_int(p.seed):
        raise DataError(f"data.seed must be an integer, found {p.seed!r}")
    if not (_is_int(p.samples_per_shard) and p.samples_per_shard >= 1):
        raise DataError(f"data.samples_per_shard must be an integer >= 1, found {p.samples_per_shard!r}")
    if not isinstance(p.skip_bad, bool):
        raise DataError(f"data.skip_bad must be true or false, found {p.skip_bad!r}")
    if not isinstance(p.out_dir, str) or not p.out_dir:
        raise DataError(f"data.out_dir must be a non-empty path, found {p.out_dir!r}")
