"""The learning-rate schedule (train.warmup_steps, lr_decay, min_lr_ratio), as a torch scheduler.

lr(s) = train.lr * f(s) for optimizer step s = 0, 1, ...:
  f(s) = (s + 1) / W                                          for s < W (linear warm-up),
  f(s) = r + (1 - r) * g(p),  p = min(1, (s - W) / max(1, S - W))  after it,
with W = warmup_steps, S = max_steps, r = min_lr_ratio and g(p) = 1 (constant),
(1 + cos(pi p)) / 2 (cosine) or 1 - p (linear).
"""

from __future__ import annotations

import math

import torch

from ddgm.training.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """f(step) of the module doc: the learning rate over train.lr."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def make_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that sets lr = train.lr * lr_factor(step) (its state is the step counter)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, train.max_steps, train.lr_decay,
                                          train.min_lr_ratio))
