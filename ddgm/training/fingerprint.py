"""Which checkpoints belong to a run: a hash of everything that must not change between a run and
its resumption (the model config, the training params, the data and the library code)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from ddgm.config import ModelConfig
from ddgm.training.config import TrainConfig

# train.* keys that may change between a run and its resumption: how long, how often, and where.
RESUMABLE_CHANGES = {"max_steps", "patience", "val_every", "checkpoint_every", "keep_checkpoints", "log_every",
                     "resume", "model_dir", "checkpoint_dir", "curve_file"}


def code_hash() -> str:
    """sha256 over the source of the ddgm package (paths and contents)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(train: TrainConfig, config: ModelConfig, data_hash: str) -> str:
    """16 hex digits of sha256 over the model config, the training params but RESUMABLE_CHANGES,
    the data manifest's hash and the library code."""
    kept = {k: v for k, v in asdict(train).items() if k not in RESUMABLE_CHANGES}
    record = {"model": config.to_dict(), "train": kept, "data": data_hash, "code": code_hash()}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
