"""manifest.json: what a prepared dataset holds (splits, image shape, levels, source, shards)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddgm.data.errors import DataError
from ddgm.data.location import file_url, open_url
from ddgm.data.raw_inputs import RawInputs

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    """Contents of manifest.json. ``shards[split]`` lists dicts with name, count, sha256 and size (bytes)."""

    splits: dict[str, int]
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_levels: int  # K: pixels are stored as levels 0..K-1
    source: dict[str, Any]
    shards: dict[str, list[dict[str, Any]]]
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # bad input files left out (data.skip_bad)
    raw_inputs: RawInputs | None = None  # content hash of the raw input files; files read, skipped (why), ignored

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, no timestamps) so equal data gives an equal hash."""
        record = {
            "format_version": FORMAT_VERSION,
            "splits": self.splits,
            "image_shape": list(self.image_shape),
            "channels": self.channels,
            "num_levels": self.num_levels,
            "source": self.source,
            "shards": self.shards,
            "class_names": self.class_names,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "raw_inputs": None if self.raw_inputs is None else self.raw_inputs.to_record(),
        }
        return json.dumps(record, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, origin: str) -> Manifest:
        """Parse and check manifest text; ``origin`` names the file in errors."""
        try:
            record = json.loads(text)
            image_shape = tuple(int(v) for v in record["image_shape"])
            if len(image_shape) != 3:
                raise DataError(f"manifest {origin}: image_shape must be (C, H, W) >= 1, found {image_shape}")
            manifest = cls(
                splits={str(k): int(v) for k, v in record["splits"].items()},
                image_shape=image_shape,
                num_levels=int(record["num_levels"]),
                source=dict(record["source"]),
                shards={str(k): [dict(s) for s in v] for k, v in record["shards"].items()},
                class_names=record["class_names"],
                skipped=list(record["skipped"]),
                raw_inputs=None if record.get("raw_inputs") is None else RawInputs.from_record(record["raw_inputs"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"manifest {origin} is corrupt: {type(exc).__name__}: {exc}") from exc
        manifest._check(origin)
        return manifest

    def _check(self, origin: str) -> None:
        if min(self.image_shape) < 1:
            raise DataError(f"manifest {origin}: image_shape must be (C, H, W) >= 1, found {self.image_shape}")
        if self.num_levels < 2:
            raise DataError(f"manifest {origin}: num_levels must be >= 2, found {self.num_levels}")
        if set(self.splits) != set(self.shards):
            raise DataError(f"manifest {origin}: splits {sorted(self.splits)} and shards {sorted(self.shards)} differ")
        for split, shards in self.shards.items():
            if any(not {"name", "count", "sha256"} <= set(s) for s in shards):
                raise DataError(f"manifest {origin}: every {split} shard needs name, count and sha256")
            total = sum(s["count"] for s in shards)
            if total != self.splits[split]:
                raise DataError(
                    f"manifest {origin}: split {split} has {self.splits[split]} samples but its shards hold {total}"
                )


def dataset_location(path_or_dir: str | Path) -> str:
    """The dataset directory/URL of a manifest path or of a dataset location itself."""
    location = str(path_or_dir)
    if location.endswith("/" + MANIFEST_NAME) or location == MANIFEST_NAME:
        return location[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return location


def _manifest_url(path_or_dir: str | Path) -> str:
    return file_url(dataset_location(path_or_dir), MANIFEST_NAME)


def _read_manifest_bytes(path_or_dir: str | Path) -> tuple[bytes, str]:
    url = _manifest_url(path_or_dir)
    try:
        with open_url(url) as f:
            return f.read(), url
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"manifest not found: {url} (run the prepare stage first)") from exc


def read_manifest(path_or_dir: str | Path) -> Manifest:
    """Read manifest.json from a dataset location (see :mod:`ddgm.data.location`) or its path."""
    data, url = _read_manifest_bytes(path_or_dir)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {url} is corrupt: not UTF-8 text") from exc
    return Manifest.from_json(text, url)


def manifest_hash(path_or_dir: str | Path) -> str:
    """sha256 (hex) of the manifest file: identifies the dataset version (e.g. as an MLflow tag)."""
    data, _ = _read_manifest_bytes(path_or_dir)
    return hashlib.sha256(data).hexdigest()


def write_manifest(manifest: Manifest, directory: str | Path) -> Path:
    """Write ``directory/manifest.json`` and return its path."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(manifest.to_json())
    return path


def shard_urls(path_or_dir: str | Path, split: str, manifest: Manifest | None = None) -> list[str]:
    """URLs (or local paths) of a split's shards, in order."""
    manifest = read_manifest(path_or_dir) if manifest is None else manifest
    if split not in manifest.shards:
        raise DataError(f"dataset {path_or_dir} has no split {split!r}; found {sorted(manifest.shards)}")
    location = dataset_location(path_or_dir)
    return [file_url(location, shard["name"]) for shard in manifest.shards[split]]
