"""What the training loop reports as it goes: a progress bar (main process) and, every
``train.log_every`` steps and at the last one, ``train/loss`` (mean over ranks), ``train/lr``,
``train/grad_norm`` and ``train/images_per_s`` (over all ranks, since the last report). The ELBO
objectives' loss is an unbiased batch estimate of -ELBO in nats per image; with the discretized
decoder it is also logged in bits/dim, ``train/neg_elbo_bpd`` = loss / (D ln 2) (the continuous
decoder gives a density, not a probability).
"""

from __future__ import annotations

import math
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ddgm.config import ModelConfig
from ddgm.training.config import TrainConfig
from ddgm.training.tracking import Tracker


class TrainLog:
    """The reports of a run that starts (or resumes) at optimizer step ``start_step``."""

    def __init__(self, accelerator: Accelerator, tracker: Tracker, train: TrainConfig, config: ModelConfig,
                 start_step: int):
        self.accelerator, self.tracker, self.train, self.data_dim = accelerator, tracker, train, config.data_dim
        self.elbo_bits = train.objective in ("full_elbo", "random_t_elbo") and config.decoder == "discretized"
        self.progress = tqdm(total=train.max_steps, initial=start_step, disable=not accelerator.is_main_process,
                             desc="train", dynamic_ncols=True)
        self.window_start, self.window_images = time.perf_counter(), 0

    def count(self, images: int) -> None:
        """``images`` more images trained on (over all ranks)."""
        self.window_images += images

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float,
             best_val_bpd: float) -> None:
        """Optimizer step ``step`` is done: advance the bar, and report when it is due (all ranks)."""
        self.progress.update(1)
        if step % self.train.log_every and step != self.train.max_steps:
            return
        elapsed = time.perf_counter() - self.window_start
        mean_loss = self.accelerator.reduce(loss.detach(), "mean").item()
        metrics = {"train/loss": mean_loss, "train/lr": lr,
                   "train/grad_norm": math.nan if grad_norm is None else float(grad_norm),
                   "train/images_per_s": self.window_images / elapsed}
        shown = {"loss": f"{mean_loss:.4g}"}
        if self.elbo_bits:
            metrics["train/neg_elbo_bpd"] = mean_loss / (self.data_dim * math.log(2.0))
            shown["bpd"] = f"{metrics['train/neg_elbo_bpd']:.3f}"
        self.tracker.log_metrics(metrics, step)
        shown |= {"val_bpd": f"{best_val_bpd:.4f}", "img_s": f"{metrics['train/images_per_s']:.0f}"}
        self.progress.set_postfix(shown)
        self.window_start, self.window_images = time.perf_counter(), 0

    def close(self) -> None:
        self.progress.close()
