"""The Accelerator of a training run: its processes, mixed precision and gradient accumulation."""

from __future__ import annotations

import os

from accelerate import Accelerator, DistributedDataParallelKwargs

from ddgm.training.config import TrainConfig


def make_accelerator(train: TrainConfig, formulation: str) -> Accelerator:
    """An Accelerator for train.grad_accum and train.mixed_precision; the scheduler steps once per
    optimizer step. The article's model leaves some of its per-level networks out of a step, which
    DDP must be told (``find_unused_parameters``)."""
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=formulation == "article")]
    return Accelerator(gradient_accumulation_steps=train.grad_accum, mixed_precision=train.mixed_precision,
                       step_scheduler_with_optimizer=False, kwargs_handlers=kwargs)


def check_world_size(accelerator: Accelerator) -> None:
    """RuntimeError unless Accelerate sees every process the launcher started ($WORLD_SIZE)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes}; "
            "on a machine without GPUs set ACCELERATE_USE_CPU=true (see infra/README.md)")
