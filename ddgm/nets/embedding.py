"""Sinusoidal timestep embedding (Vaswani et al. 2017; Ho et al. 2020) and argument checks."""

from __future__ import annotations

import math

import torch


def check_int(name: str, value: int, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``; raise ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed a 1-D tensor of timesteps ``t`` (int or float, shape [B]) as float32 [B, dim].

    With ``half = dim // 2`` and frequencies ``w_i = max_period ** (-i / half)``, row b is
    ``[cos(t_b w_0), ..., cos(t_b w_{half-1}), sin(t_b w_0), ..., sin(t_b w_{half-1})]``,
    followed by a zero column when ``dim`` is odd.
    """
    check_int("dim", dim, 2)
    if not max_period > 0:
        raise ValueError(f"max_period must be > 0, got {max_period!r}")
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a 1-D tensor of timesteps [B], got {shape}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
