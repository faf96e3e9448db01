"""Resumable checkpoints: Accelerate's state plus ddgm's own, made visible atomically.

Every rank calls ``Accelerator.save_state`` into ``<dir>/.tmp-step-N``; the main process adds
``training_state.json`` (step counter, best validation, RNG and sampler state), the EMA
weights as safetensors, and then renames the folder to ``<dir>/step-N``. A kill during a save
leaves only a ``.tmp-`` folder, which resume ignores and the next save removes.

A run that starts from scratch (``resume: false``, or checkpoints of other params) first moves
what an earlier run left in the folder into ``<dir>/superseded-<time>/``: otherwise pruning
would count the old, higher-numbered checkpoints as the newest and delete the new run's, and
a resume after preemption would find only the old run's and start from scratch again.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ddgm.atomic import atomic_write

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
BEST_FILE = "best.safetensors"  # beside the step folders: the EMA weights of the best validation so far


def completed_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
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
        _discard(final)
    tmp.rename(final)
    for old in completed_checkpoints(directory)[:-keep]:
        _discard(old)
    for stale in [*Path(directory).glob(".tmp-step-*"), *Path(directory).glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint folder; renamed first, so a kill mid-delete cannot leave a
    ``step-N`` folder that still holds training_state.json but lacks weights."""
    doomed = checkpoint.with_name(f".old-{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    checkpoint.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def leftovers(directory: str | Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """What a run leaves in a checkpoint folder: step and temporary folders, and ``extra`` names."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if STEP_DIR.match(p.name) or p.name.startswith((".tmp-step-", ".old-step-")) or p.name in extra)


def supersede(directory: str | Path, extra: tuple[str, ...] = ()) -> Path | None:
    """Move an earlier run's leftovers into ``<dir>/superseded-<UTC time>/``; that folder, or None."""
    found = leftovers(directory, extra)
    if not found:
        return None
    target = Path(directory) / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir()
    for path in found:
        path.rename(target / path.name)
    return target


def read_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ddgm's state and the EMA weights of a complete checkpoint."""
    return json.loads((checkpoint / STATE_FILE).read_text()), load_file(str(checkpoint / EMA_FILE))


def generator_state_from_list(generator: torch.Generator, values: list[int]) -> None:
    generator.set_state(torch.tensor(values, dtype=torch.uint8))


def save_best(directory: str | Path, weights: dict[str, torch.Tensor]) -> None:
    """Main process: keep ``weights`` as ``<dir>/best.safetensors`` (atomically)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write(Path(directory) / BEST_FILE, lambda tmp: save_file(tensors, tmp))


def best_weights(directory: str | Path) -> dict[str, torch.Tensor] | None:
    """The weights ``save_best`` kept, or None when no validation has run."""
    path = Path(directory) / BEST_FILE
    return load_file(str(path)) if path.is_file() else None
