"""Resumable checkpoints: Accelerate's state plus ddgm's own, made visible atomically.

Every rank calls ``Accelerator.save_state`` into ``<dir>/.tmp-step-N``; the main process adds
``training_state.json`` (step counter, best validation, RNG and sampler state), the EMA
weights as safetensors, and then renames the folder to ``<dir>/step-N``. A kill during a save
leaves only a ``.tmp-`` folder, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ddgm.serialization import atomic_write

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"


def completed_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = completed_checkpoints(directory)
    return found[-1] if found else None


def temporary_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f".tmp-step-{step:08d}"


def finalize(directory: str | Path, step: int, state: dict[str, Any], ema_weights: dict[str, torch.Tensor],
             keep: int) -> Path:
    """Main process: add ddgm's state to the temporary folder, rename it into place, prune old ones."""
    tmp = temporary_dir(directory, step)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema_weights.items()}, str(tmp / EMA_FILE))
    atomic_write(tmp / STATE_FILE, lambda path: Path(path).write_text(json.dumps(state)))
    final = Path(directory) / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in completed_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(directory).glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ddgm's state and the EMA weights of a complete checkpoint."""
    return json.loads((checkpoint / STATE_FILE).read_text()), load_file(str(checkpoint / EMA_FILE))


def generator_state_to_list(generator: torch.Generator) -> list[int]:
    return generator.get_state().tolist()


def generator_state_from_list(generator: torch.Generator, values: list[int]) -> None:
    generator.set_state(torch.tensor(values, dtype=torch.uint8))
