"""Speed settings of the training step, one ``train.*`` param each (see README, "Speed").

Only the online model's step is affected: the EMA model, validation, the ELBO and bits/dim
run in float32, uncompiled and in the default memory layout whatever these settings say.

- ``compile``: ``torch.compile`` of every network (U-Net, MLP) in place (``Module.compile``),
  so state dicts, checkpoints and saved models keep plain parameter names;
- ``channels_last``: NHWC weights and input batches (what oneDNN/cuDNN convolutions prefer);
- ``allow_tf32``: TF32 matmuls and convolutions (CUDA only);
- ``fused_optimizer``: the fused AdamW kernel (CUDA and CPU; 4x faster than the per-tensor loop
  on the default model's CPU step);
- ``pin_memory``: page-locked batches copied with ``non_blocking=True`` (CUDA only).
"""

from __future__ import annotations

import torch
from torch import nn

from ddgm.nets import MLP, UNet
from ddgm.training.config import TrainConfig


def configure_backends(train: TrainConfig, device: torch.device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA when ``allow_tf32`` (else full float32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = train.allow_tf32
        torch.backends.cudnn.allow_tf32 = train.allow_tf32


def make_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (its fused kernel when ``fused_optimizer``, on CUDA and CPU alike; else the multi-tensor
    foreach one) or Adamax (foreach: torch has no fused Adamax)."""
    if train.optimizer == "adamw" and train.fused_optimizer:
        return torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, foreach=True)
    return torch.optim.Adamax(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, foreach=True)


def compile_networks(model: nn.Module, mode: str) -> int:
    """Compile every U-Net/MLP inside ``model`` in place; the number compiled. The code around
    them (sampling t, the ELBO terms) stays eager: it is cheap and full of data-dependent branches."""
    networks = [module for module in model.modules() if isinstance(module, (UNet, MLP))]
    for network in networks:
        network.compile(mode=mode)
    return len(networks)


def batch_to_device(x: torch.Tensor, device: torch.device, train: TrainConfig) -> torch.Tensor:
    """A batch on ``device`` in the training layout; on CUDA with ``pin_memory`` it is page-locked
    first and copied without blocking the host (the copy is ordered before the step on its stream)."""
    x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" and train.pin_memory else x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if train.channels_last and x.dim() == 4 else x
