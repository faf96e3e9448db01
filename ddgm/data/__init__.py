"""Data side of the pipeline: sources -> sharded webdataset + manifest -> training/evaluation loaders."""

from ddgm.data.errors import DataError
from ddgm.data.loader import EvalLoader, TrainLoader, eval_batches, load_split
from ddgm.data.manifest import Manifest, manifest_hash, read_manifest, shard_urls
from ddgm.data.params import DataParams
from ddgm.data.prepare import prepare_dataset
from ddgm.data.verification import verify_once, verify_shards

__all__ = [
    "DataError",
    "DataParams",
    "EvalLoader",
    "Manifest",
    "TrainLoader",
    "eval_batches",
    "load_split",
    "manifest_hash",
    "prepare_dataset",
    "read_manifest",
    "shard_urls",
    "verify_once",
    "verify_shards",
]
