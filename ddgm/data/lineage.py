"""How a run names its data: the dataset input a tracker logs for a prepared dataset (MLflow's ``log_input``).

name: the raw input's file or folder name ("digits" for the bundled data); digest: the manifest's sha256
(one per dataset version); source: the raw input's location (data.path, or "sklearn digits");
profile: splits and counts, image shape, levels, the raw inputs' content hash and files read/skipped,
and where the shards were read from.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from ddgm.data.manifest import Manifest


def dataset_input(manifest: Manifest, manifest_sha256: str, shards_location: str) -> dict[str, Any]:
    """Keyword arguments of ``Tracker.log_dataset`` for the dataset of ``manifest``."""
    source_kind = str(manifest.source.get("source", "unknown"))
    raw = manifest.raw_inputs
    location = raw.location if raw is not None else str(manifest.source.get("path") or source_kind)
    name = "digits" if source_kind == "digits" else (PurePath(location).name or location)
    profile: dict[str, Any] = {
        "num_rows": sum(manifest.splits.values()),
        "splits": dict(manifest.splits),
        "image_shape": list(manifest.image_shape),
        "num_levels": manifest.num_levels,
        "num_classes": None if manifest.class_names is None else len(manifest.class_names),
        "manifest_sha256": manifest_sha256,
        "shards": shards_location,
    }
    if raw is not None:
        profile.update(raw_sha256=raw.sha256, files_read=raw.files_read, files_skipped=len(raw.skipped),
                       files_ignored=len(raw.ignored))
    return {
        "name": name,
        "digest": manifest_sha256,
        "source": location,
        "source_type": "code" if source_kind == "digits" else "local",
        "profile": profile,
    }
