"""The exact negative ELBO over a whole data split, split across processes and summed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddgm.data import EvalLoader
from ddgm.likelihood import elbo_terms, nats_to_bits_per_dim
from ddgm.models import DDGM

Reduce = Callable[[torch.Tensor], torch.Tensor]
# Noise streams: the training loop's validation (which picks the best checkpoint) and the final
# evaluation draw disjoint z_t, so the reported val bits/dim is not biased low by the selection.
NOISE_STREAMS = ("validation", "evaluation")


@dataclass
class SplitELBO:
    """Mean per-image terms in nats over a split: L_T, sum_{t>=2} L_{t-1}, L_0, and the total;
    ``per_level`` is the mean L_{t-1} for t = 1..T."""

    count: int
    prior: float
    diffusion: float
    decoder: float
    per_level: torch.Tensor
    data_dim: int

    @property
    def total(self) -> float:
        return self.prior + self.diffusion + self.decoder

    def bits_per_dim(self) -> dict[str, float]:
        """The total and each term in bits per dimension."""
        return {name: float(nats_to_bits_per_dim(getattr(self, name), self.data_dim))
                for name in ("total", "prior", "diffusion", "decoder")}


def split_elbo(
    model: DDGM,
    shards: str,
    split: str,
    batch_size: int = 64,
    chunk: int = 50,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Reduce = lambda x: x,
    decoder: str | None = None,
    max_images: int | None = None,
    noise: str = "validation",
) -> SplitELBO:
    """Every image of ``split`` exactly once across ranks (``reduce_sum`` all-reduces the sums),
    with fresh z_t ~ q(z_t | x) drawn from a generator seeded by (seed, rank) in the ``noise`` stream
    (``validation`` during training, ``evaluation`` for reported results: never the same draws).

    ``max_images``: use only about that many images, a fixed subset: rank r of W takes the first
    max_images * (r + 1) // W - max_images * r // W images of its block."""
    if noise not in NOISE_STREAMS:
        raise ValueError(f"noise must be one of {NOISE_STREAMS}, got {noise!r}")
    device = next(model.parameters()).device
    stream_seed = seed * len(NOISE_STREAMS) + NOISE_STREAMS.index(noise)  # distinct in the low 32 bits too
    generator = torch.Generator(device=device).manual_seed(stream_seed * 1000 + rank)
    sums = torch.zeros(3 + model.num_steps, dtype=torch.float64, device=device)
    limit = None if max_images is None else max_images * (rank + 1) // world_size - max_images * rank // world_size
    seen = 0
    for x, _ in EvalLoader(shards, split, batch_size, rank, world_size):
        if limit is not None:
            if seen >= limit:
                break
            x = x[: limit - seen]
            seen += x.shape[0]
        terms = elbo_terms(model, x.to(device), chunk=chunk, generator=generator, decoder=decoder)
        sums[0] += x.shape[0]
        sums[1] += terms.prior.double().sum()
        sums[2] += terms.diffusion.double().sum()
        sums[3:] += terms.levels.double().sum(0)
    sums = reduce_sum(sums)
    count = int(sums[0].item())
    if count == 0:
        raise ValueError(f"split {split!r} of {shards} holds no images")
    mean = (sums / count).cpu()
    return SplitELBO(count, float(mean[1]), float(mean[2]), float(mean[3]), mean[3:].float(), model.config.data_dim)
