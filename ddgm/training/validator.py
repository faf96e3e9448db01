"""Validation during training: the exact val -ELBO (all T terms, float32, the discretized decoder) of
the EMA weights, every ``train.val_every`` steps and at the last step. Each validation is logged
(``val/*_bpd`` and ``val/*_nats``, and a sample grid), appended to the curve file, and decides the
model: the EMA weights of the best one so far are kept (checkpoint.BEST_FILE) and become models/;
``train.patience`` validations in a row without improvement stop the run early.
"""

from __future__ import annotations

import time
from pathlib import Path

from ddgm.training import checkpoint as ckpt
from ddgm.training.config import TrainConfig
from ddgm.training.curve import curve_row, read_curve, write_curve
from ddgm.training.progress import validation_grid
from ddgm.training.run_state import RunState
from ddgm.training.step import TrainingStep
from ddgm.training.tracking import Tracker
from ddgm.training.validation import split_elbo

TERMS = ("total", "prior", "diffusion", "decoder")


class Validator:
    """Validates the EMA model of ``step`` on the val split of ``shards``; ``resumed``: the curve file
    keeps its rows up to the resumed step (else it starts empty)."""

    def __init__(self, step: TrainingStep, tracker: Tracker, shards: str, train: TrainConfig, state: RunState,
                 resumed: bool):
        self.step, self.tracker, self.shards, self.train = step, tracker, shards, train
        self.curve_path, self.best_dir = Path(train.curve_file), Path(train.checkpoint_dir)
        self.seconds = 0.0  # wall time spent validating in this process (since it started or resumed)
        self.rows = [row for row in read_curve(self.curve_path) if row["step"] <= state.step] if resumed else []
        if not resumed and step.accelerator.is_main_process and self.curve_path.exists():
            write_curve(self.curve_path, [])  # else a resume before the first validation would keep its rows

    def due(self, step: int) -> bool:
        return step % self.train.val_every == 0 or step == self.train.max_steps

    def __call__(self, state: RunState) -> None:
        """Validate at ``state.step`` and update its best validation (all ranks take part)."""
        accelerator, t, model = self.step.accelerator, self.train, self.step.ema.ema_model
        started = time.perf_counter()
        model.eval()
        result = split_elbo(model, self.shards, "val", t.val_batch_size, t.val_chunk, t.seed, accelerator.process_index,
                            accelerator.num_processes, reduce_sum=lambda x: accelerator.reduce(x, "sum"),
                            decoder="discretized", max_images=t.val_max_images)
        bpd = result.bits_per_dim()
        self.tracker.log_metrics({f"val/{k}_bpd": v for k, v in bpd.items()}
                                 | {f"val/{k}_nats": getattr(result, k) for k in TERMS}, state.step)
        if accelerator.is_main_process:  # samples from fixed noise, so the UI shows them improving
            self.tracker.log_image(validation_grid(model, seed=t.seed), "samples/grid", state.step)
        if bpd["total"] < state.best_val_bpd:
            state.best_val_bpd, state.best_step, state.bad_validations = bpd["total"], state.step, 0
            if accelerator.is_main_process:
                ckpt.save_best(self.best_dir, model.state_dict())
        else:
            state.bad_validations += 1
        if accelerator.is_main_process:
            self.rows.append(curve_row(state.step, bpd))
            write_curve(self.curve_path, self.rows)
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.tracker.log_metrics({"val/seconds": seconds}, state.step)

    def write_curve(self) -> Path:
        """Main process: the curve file with every validation's row; its path."""
        write_curve(self.curve_path, self.rows)
        return self.curve_path
