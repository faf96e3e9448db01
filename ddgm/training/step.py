"""One optimizer step: the model and its objective, the optimizer and learning-rate schedule, the
timestep sampler, the EMA copy and the generator of t and the noise, prepared by Accelerate.

``build_training_step`` makes it; ``TrainingStep(x, step)`` takes one micro-step. The training loop
runs it, and so does benchmarks/train_throughput.py (to time it without the loader, logging and
checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from ema_pytorch import EMA
from torch import nn

from ddgm.config import ModelConfig
from ddgm.models import DDGM, build_model
from ddgm.objectives import ObjectiveOutput, compute_objective
from ddgm.timestep_sampler import UniformSampler, make_timestep_sampler
from ddgm.training.acceleration import compile_networks, configure_backends, make_optimizer
from ddgm.training.config import TrainConfig
from ddgm.training.lr_schedule import make_lr_scheduler


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; the last checkpoint is left as it was."""


class ObjectiveModule(nn.Module):
    """Wraps a DDGM so that DDP sees the objective as ``forward`` (gradient sync hooks fire)."""

    def __init__(self, model: DDGM, objective: str, sampler: UniformSampler, vlb_weight: float):
        super().__init__()
        self.model, self.objective, self.sampler, self.vlb_weight = model, objective, sampler, vlb_weight

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> ObjectiveOutput:
        return compute_objective(self.objective, self.model, x, self.sampler, generator, self.vlb_weight)


def generator_seed(train: TrainConfig, rank: int) -> int:
    """The seed of rank ``rank``'s generator of t and the noise (each rank draws its own)."""
    return train.seed * 100003 + rank


@dataclass
class TrainingStep:
    """Everything one optimizer step touches, and the step itself."""

    accelerator: Accelerator
    objective: nn.Module  # the prepared ObjectiveModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: UniformSampler
    ema: EMA
    generator: torch.Generator
    train: TrainConfig

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One micro-step on the batch ``x`` (already on the device) towards optimizer step ``step``:
        loss, backward, importance-sampler update, then on the last micro-step clipping, the
        optimizer and scheduler steps and the EMA update. The mean loss and the gradient norm
        (None on accumulation micro-steps); NonFiniteLoss before any weight changes."""
        accelerator, t = self.accelerator, self.train
        with accelerator.accumulate(self.objective):
            out = self.objective(x, self.generator)
            loss = out.loss.mean()
            if not bool(accelerator.gather(torch.isfinite(loss.detach())[None]).all()):
                raise NonFiniteLoss(f"non-finite loss at step {step}; the last checkpoint is kept")
            accelerator.backward(loss)
            if out.terms is not None and t.timestep_sampler == "importance":
                self.sampler.update(accelerator.gather(out.t), accelerator.gather(out.terms.detach()))
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(self.objective.parameters(), t.grad_clip or math.inf)
            self.optimizer.step()  # a no-op on accumulation micro-steps, as is zero_grad
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            self.ema.update()
        return loss.detach(), grad_norm

    @property
    def lr(self) -> float:
        """The learning rate of the last step."""
        return float(self.scheduler.get_last_lr()[0])


def build_training_step(train: TrainConfig, config: ModelConfig, accelerator: Accelerator) -> TrainingStep:
    """Model (seeded by train.seed), its EMA copy, timestep sampler, objective, optimizer and
    learning-rate schedule, prepared by ``accelerator`` with the speed settings of ``train``."""
    torch.manual_seed(train.seed)
    model = build_model(config)
    # the EMA copy is taken first: it stays float32, uncompiled and contiguous for validation
    ema = EMA(model, beta=train.ema_decay, update_after_step=0, update_every=1, include_online_model=False,
              use_foreach=True)
    configure_backends(train, accelerator.device)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    if train.compile:
        compile_networks(model, train.compile_mode)
    sampler = make_timestep_sampler(train.timestep_sampler, config.diffusion.num_steps, train.uniform_mix)
    objective = ObjectiveModule(model, train.objective, sampler, train.vlb_weight)
    optimizer = make_optimizer(train, model)
    scheduler = make_lr_scheduler(optimizer, train)
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    ema.to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(generator_seed(train, accelerator.process_index))
    return TrainingStep(accelerator, objective, optimizer, scheduler, sampler, ema, generator, train)
