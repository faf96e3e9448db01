"""Samplers of p_theta: ancestral over all (or a respaced subset of) levels, and DDIM.

Respacing (Nichol & Dhariwal 2021) keeps a subset s_1 < ... < s_k = T of levels and uses the
diffusion with abar'_i = abar_{s_i}, i.e. beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}} (s_0 = 0);
the network still sees the original timestep s_i. DDIM (Song et al. 2021) steps
z_{s_{i-1}} = sqrt(abar_prev) x^ + sqrt(1 - abar_prev - sigma^2) eps^ + sigma noise with
sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)).
Every sampler draws its noise from the given torch.Generator, so a seed fixes the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ddgm.config import SAMPLERS
from ddgm.diffusion import GaussianDiffusion
from ddgm.models.base import DDGM
from ddgm.models.epsilon import EpsilonDDGM
from ddgm.quantization import unit_to_levels


@dataclass
class SampleOutput:
    """images: x in [-1, 1] [N, C, H, W]; trajectory: z_{s_k}, ..., z_{s_1}, x when kept."""

    images: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)


def timestep_subset(num_steps: int, count: int) -> list[int]:
    """``count`` levels evenly spread over 1..T, always including T (and 1 when count > 1)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_steps:
        raise ValueError(f"num_sample_steps must be an integer in [1, {num_steps}], got {count!r}")
    if count == 1:
        return [num_steps]
    return sorted({round(v) for v in np.linspace(1, num_steps, count).tolist()})


def respaced_diffusion(diffusion: GaussianDiffusion, steps: list[int]) -> GaussianDiffusion:
    """The diffusion over levels ``steps`` only: beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}.

    Where the ratio is below 2^-53 (levels of nearly pure noise merged, e.g. several betas clipped
    at 0.999), 1 - ratio rounds to 1; beta'_i is then the largest double below 1."""
    abar = diffusion.abar64[[0, *steps]]
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], np.nextafter(1.0, 0.0))
    return GaussianDiffusion(betas).to(diffusion.abar.device)


def _start(model: DDGM, num_samples: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randn((num_samples, *model.image_shape), generator=generator, device=device)


def _denoised(
    model: EpsilonDDGM, z: torch.Tensor, t: torch.Tensor, clip: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(eps^, x^, v) at original level t, with x^ clipped to [-1, 1] and eps^ made consistent."""
    eps, interp = model.network_output(z, t)
    x0 = model.diffusion.x0_from_eps(z, t, eps)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = model.diffusion.eps_from_x0(z, t, x0)
    return eps, x0, interp


@torch.no_grad()
def sample_ancestral(
    model: DDGM,
    num_samples: int,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """z_T ~ N(0, I), z_{t-1} ~ p_theta(z_{t-1} | z_t), x = mean of p_theta(x | z_1).

    With num_steps < T (epsilon models only) the chain runs on a respaced subset of levels.
    """
    device = next(model.parameters()).device
    steps = timestep_subset(model.num_steps, model.num_steps if num_steps is None else num_steps)
    z = _start(model, num_samples, generator, device)
    trajectory = [z] if keep_trajectory else []
    if not isinstance(model, EpsilonDDGM):
        if len(steps) != model.num_steps:
            raise ValueError("respaced sampling needs the epsilon formulation; the article model samples all T levels")
        for step in reversed(steps):
            t = torch.full((num_samples,), step, device=device, dtype=torch.long)
            mean, log_var = model.reverse_mean_logvar(z, t)
            z = mean if step == 1 else mean + torch.exp(0.5 * log_var) * _noise(z, generator)
            trajectory += [z] if keep_trajectory else []
        return SampleOutput(z, trajectory)
    spaced = respaced_diffusion(model.diffusion, steps)
    for index in range(len(steps), 0, -1):
        i = torch.full((num_samples,), index, device=device, dtype=torch.long)
        t = torch.full((num_samples,), steps[index - 1], device=device, dtype=torch.long)
        _, x0, interp = _denoised(model, z, t, clip_denoised)
        mean, _ = spaced.q_posterior(x0, z, i)
        if index == 1:
            z = mean
        else:
            log_var = spaced.reverse_log_variance(model.config.variance, i, z, interp)
            z = mean + torch.exp(0.5 * log_var) * _noise(z, generator)
        trajectory += [z] if keep_trajectory else []
    return SampleOutput(z, trajectory)


@torch.no_grad()
def sample_ddim(
    model: DDGM,
    num_samples: int,
    num_steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """DDIM over ``num_steps`` levels (one network call each); eta = 0 is deterministic,
    eta = 1 with every level is ancestral sampling with variance beta~_t."""
    if not isinstance(model, EpsilonDDGM):
        raise ValueError("the DDIM sampler needs the epsilon formulation")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:  # rejects NaN too
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    device = next(model.parameters()).device
    steps = timestep_subset(model.num_steps, num_steps)
    abar = model.diffusion.abar64  # float64: 1 - abar of the float32 table cancels at small t
    z = _start(model, num_samples, generator, device)
    trajectory = [z] if keep_trajectory else []
    for index in range(len(steps), 0, -1):
        step, prev = steps[index - 1], steps[index - 2] if index > 1 else 0
        t = torch.full((num_samples,), step, device=device, dtype=torch.long)
        eps, x0, _ = _denoised(model, z, t, clip_denoised)
        abar_t, abar_prev = float(abar[step]), float(abar[prev])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        z = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if index > 1:
            z = z + sigma * _noise(z, generator)
        trajectory += [z] if keep_trajectory else []
    return SampleOutput(z, trajectory)


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def sample(
    model: DDGM,
    num_samples: int,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """Dispatch on the sampler's name ('ancestral' or 'ddim')."""
    if sampler == "ancestral":
        return sample_ancestral(model, num_samples, num_steps, generator, clip_denoised, keep_trajectory)
    if sampler == "ddim":
        steps = model.num_steps if num_steps is None else num_steps
        return sample_ddim(model, num_samples, steps, eta, generator, clip_denoised, keep_trajectory)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def sample_levels(
    model: DDGM,
    num_samples: int,
    sampler: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 500,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """``num_samples`` samples as integer levels 0..K-1 [N, C, H, W] (uint8 for K <= 256), drawn
    ``batch_size`` at a time from one generator seeded with ``seed`` on the model's device."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batches, left = [], num_samples
    while left > 0:
        out = sample(model, min(left, batch_size), sampler, num_steps, eta, generator, clip_denoised)
        batches.append(unit_to_levels(out.images, model.num_levels))
        left -= batches[-1].shape[0]
    return torch.cat(batches)
