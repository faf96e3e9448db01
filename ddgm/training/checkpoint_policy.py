"""When a training run checkpoints, what it resumes from, and what a checkpoint holds besides
Accelerate's state (model, optimizer, scheduler, RNGs): the RunState, the run's fingerprint, every
rank's generator of t and the noise, the timestep sampler's statistics and the EMA weights.

- A run resumes from the newest complete checkpoint in its folder whose fingerprint is its own
  (``train.resume: false`` never resumes); else it starts from scratch, after moving what an
  earlier run left in the folder aside (``checkpoint.supersede``).
- It checkpoints every ``train.checkpoint_every`` steps, at ``train.max_steps``, when it stops
  early and when any rank received SIGTERM/SIGUSR1.
The files and their atomic renames are ddgm/training/checkpoint.py.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ddgm.training import checkpoint as ckpt
from ddgm.training.config import TrainConfig
from ddgm.training.run_state import RunState
from ddgm.training.step import TrainingStep, generator_seed

Saved = tuple[Path, dict[str, Any], dict[str, torch.Tensor]]  # checkpoint folder, ddgm's state, EMA weights


class CheckpointPolicy:
    """The checkpoints of one run in ``directory`` (its fingerprint: ``run_fingerprint``)."""

    def __init__(self, directory: str | Path, train: TrainConfig, run_fingerprint: str, step: TrainingStep):
        self.directory, self.train, self.fingerprint, self.step = Path(directory), train, run_fingerprint, step

    def resume(self, state: RunState) -> bool:
        """Restore this run's newest checkpoint into the training step and ``state``; False when the run
        starts from scratch (an earlier run's leftovers are then moved aside)."""
        found = self._own_latest()
        if found is None:
            self._start_fresh()
            return False
        self._restore(*found, state)
        return True

    def due(self, step: int, stopped_early: bool, preempted: bool) -> bool:
        """Whether to checkpoint after optimizer step ``step``."""
        return step % self.train.checkpoint_every == 0 or step == self.train.max_steps or stopped_early or preempted

    def save(self, state: RunState) -> None:
        """Every rank: Accelerate's state into a temporary folder; the main process adds ddgm's state
        and the EMA weights and renames it into place (pruning the oldest)."""
        accelerator, step = self.step.accelerator, self.step
        accelerator.save_state(str(ckpt.temporary_dir(self.directory, state.step)))
        generators = accelerator.gather(step.generator.get_state().to(accelerator.device)[None])
        if accelerator.is_main_process:
            record = dict(asdict(state), fingerprint=self.fingerprint, generators=generators.cpu().tolist(),
                          sampler={k: v.tolist() for k, v in step.sampler.state_dict().items()})
            ckpt.finalize(self.directory, state.step, record, step.ema.state_dict(), self.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    def _own_latest(self) -> Saved | None:
        latest = ckpt.latest_checkpoint(self.directory) if self.train.resume else None
        if latest is None:
            return None
        saved, ema_weights = ckpt.read_state(latest)
        if saved.get("fingerprint") != self.fingerprint:
            self.step.accelerator.print(f"ignoring checkpoints in {self.directory}: they belong to other params, "
                                        "data or code")
            return None
        return latest, saved, ema_weights

    def _start_fresh(self) -> None:
        accelerator = self.step.accelerator
        accelerator.wait_for_everyone()  # every rank has looked before anything moves
        if accelerator.is_main_process:
            moved = ckpt.supersede(self.directory, extra=(ckpt.BEST_FILE,))
            if moved is not None:
                accelerator.print(f"starting from scratch: moved the earlier run's checkpoints to {moved}")
        accelerator.wait_for_everyone()

    def _restore(self, latest: Path, saved: dict[str, Any], ema_weights: dict[str, torch.Tensor],
                 state: RunState) -> None:
        accelerator, step = self.step.accelerator, self.step
        rank, world = accelerator.process_index, accelerator.num_processes
        accelerator.load_state(str(latest))
        step.ema.load_state_dict(ema_weights)
        if len(saved["generators"]) == world:
            ckpt.generator_state_from_list(step.generator, saved["generators"][rank])
        else:
            step.generator.manual_seed(generator_seed(self.train, rank) + 7919 * (saved["step"] + 1))
            accelerator.print(f"{latest} was written by {len(saved['generators'])} processes, this run has {world}: "
                              "training goes on, with other data order and noise than an uninterrupted run")
        step.sampler.load_state_dict({k: torch.tensor(v).numpy() for k, v in saved["sampler"].items()})
        for field in fields(RunState):
            setattr(state, field.name, saved[field.name])
        accelerator.print(f"resumed from {latest} at step {state.step}")
