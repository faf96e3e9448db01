"""The prepare stage: read a source, split it, write shards and manifest.json atomically."""

from __future__ import annotations

from pathlib import Path

from ddgm.data.manifest import Manifest, write_manifest
from ddgm.data.params import DataParams
from ddgm.data.shards import write_split
from ddgm.data.sources import load_source
from ddgm.data.splits import SPLITS, random_split
from ddgm.data.staging import staged_directory


def prepare_dataset(params: DataParams, out_dir: str | Path | None = None) -> Manifest:
    """Build the dataset described by ``params`` in ``out_dir`` (default ``params.out_dir``).

    The source is read and checked in full before anything is written; the shards and manifest are
    written to a temporary directory that replaces ``out_dir`` only when complete, so bad input
    leaves the previous dataset as it was.
    """
    data = load_source(params)
    splits = data.fixed_splits or random_split(len(data.images), params.val_fraction, params.test_fraction, params.seed)
    with staged_directory(params.out_dir if out_dir is None else out_dir) as staging:
        shards = {
            split: write_split(
                staging, split, data.images[splits[split]], data.labels[splits[split]], params.samples_per_shard
            )
            for split in SPLITS
        }
        manifest = Manifest(
            splits={split: len(splits[split]) for split in SPLITS},
            image_shape=data.image_shape,
            num_levels=data.num_levels,
            source=params.source_record(),
            shards=shards,
            class_names=data.class_names,
            skipped=data.skipped,
            raw_inputs=data.raw,
        )
        write_manifest(manifest, staging)
    return manifest
