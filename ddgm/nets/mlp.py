"""Fully connected reverse-process network for flat (vector) data."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from ddgm.nets.embedding import check_int, timestep_embedding


class MLP(nn.Module):
    """MLP ``[B, in_dim] -> [B, out_dim]`` with ``depth`` hidden layers of width ``hidden_dim``.

    Hidden layer i computes ``h = SiLU(W_i h + b_i [+ tau_i(t)])``; the output layer is linear.
    With ``time_embed_dim`` set, ``t`` is embedded sinusoidally (``time_embed_dim`` features),
    passed through Linear -> SiLU -> Linear, and split into one bias ``tau_i(t)`` per hidden
    layer. With ``time_embed_dim=None`` the network does not depend on time and ``t`` is ignored
    (one such network per step in the "article" DDGM).
    ``zero_init_output`` zero-initialises the output layer, so the network starts at exactly 0.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 256,
        depth: int = 3,
        time_embed_dim: int | None = None,
        zero_init_output: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, 1)
        self.out_dim = check_int("out_dim", out_dim, 1)
        check_int("hidden_dim", hidden_dim, 1)
        self.depth = check_int("depth", depth, 1)
        self.time_embed_dim = None if time_embed_dim is None else check_int("time_embed_dim", time_embed_dim, 2)

        dims = [in_dim] + [hidden_dim] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.act = nn.SiLU()
        self.output = nn.Linear(hidden_dim, out_dim)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)
        self.time_mlp = None
        if self.time_embed_dim is not None:
            self.time_mlp = nn.Sequential(
                nn.Linear(self.time_embed_dim, hidden_dim),
                nn.SiLU(),
                nn.Linear(hidden_dim, depth * hidden_dim),
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Map ``x`` [B, in_dim] (and timesteps ``t`` [B] if time-conditioned) to [B, out_dim]."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape [B, {self.in_dim}], got {tuple(x.shape)}")
        if self.time_mlp is None or self.time_embed_dim is None:
            biases = [0.0] * self.depth
        else:
            if t is None:
                raise ValueError("t is required when time_embed_dim is set, got None")
            if t.shape != (x.shape[0],):
                raise ValueError(f"t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
            temb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(x.dtype))
            biases = temb.chunk(self.depth, dim=1)
        h = x
        for layer, bias in zip(self.hidden, biases, strict=True):
            h = self.act(layer(h) + bias)
        return self.output(h)
