"""Evaluation of the negative ELBO over all T terms, per term and in bits per dimension.

-log p(x) <= L_T + sum_{t=2..T} L_{t-1} + L_0, each L_{t-1} estimated with one fresh
z_t ~ q(z_t | x) per image and level (no subsampling of t). Work is chunked over levels so
a batch of B images runs B * chunk rows through the network at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddgm.models.base import DDGM


@dataclass
class ELBOTerms:
    """Per-example terms in nats: prior L_T [B], per-level L_{t-1} [B, T] (column t-1 holds L_{t-1})."""

    prior: torch.Tensor
    levels: torch.Tensor

    @property
    def decoder(self) -> torch.Tensor:
        """L_0 = -log p(x | z_1) [B]."""
        return self.levels[:, 0]

    @property
    def diffusion(self) -> torch.Tensor:
        """sum_{t=2..T} L_{t-1} [B]."""
        return self.levels[:, 1:].sum(1)

    @property
    def total(self) -> torch.Tensor:
        """The negative ELBO [B]."""
        return self.prior + self.levels.sum(1)


def nats_to_bits_per_dim(nats: torch.Tensor | float, data_dim: int) -> torch.Tensor | float:
    """bits/dim = nats / (D ln 2)."""
    return nats / (data_dim * math.log(2.0))


@torch.no_grad()
def elbo_terms(
    model: DDGM,
    x: torch.Tensor,
    chunk: int = 50,
    generator: torch.Generator | None = None,
    decoder: str | None = None,
) -> ELBOTerms:
    """All T+1 terms of the negative ELBO for a batch x (in [-1, 1], shape [B, C, H, W])."""
    model.check_input(x)
    batch, steps = x.shape[0], model.num_steps
    levels = torch.empty(batch, steps, device=x.device)
    for start in range(1, steps + 1, chunk):
        stop = min(start + chunk, steps + 1)
        t = torch.arange(start, stop, device=x.device).repeat_interleave(batch)
        x_rep = x.repeat(stop - start, 1, 1, 1)
        noise = torch.randn(x_rep.shape, generator=generator, device=x.device, dtype=x.dtype)
        terms = model.loss_terms(x_rep, model.diffusion.q_sample(x_rep, t, noise), t, decoder)
        levels[:, start - 1 : stop - 1] = terms.view(stop - start, batch).T
    return ELBOTerms(model.diffusion.prior_kl(x), levels)
