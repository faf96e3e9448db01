"""Training objectives. Each returns a per-example loss [B] and the per-example terms it saw.

Negative ELBO (nats) = L_T + sum_{t=2..T} L_{t-1} + L_0   (see ddgm.models.base.DDGM.loss_terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddgm.models.base import DDGM
from ddgm.models.epsilon import EpsilonDDGM
from ddgm.timestep_sampler import UniformSampler

OBJECTIVES = ("full_elbo", "random_t_elbo", "simple", "hybrid")


@dataclass
class ObjectiveOutput:
    """loss: what to minimise, per example; t and terms: the timesteps drawn and L_{t-1} at them
    (for the importance sampler and logging; empty for the full ELBO)."""

    loss: torch.Tensor
    t: torch.Tensor | None = None
    terms: torch.Tensor | None = None


def full_elbo(model: DDGM, x: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
    """-ELBO with every term at once, the article's way: one forward chain z_1..z_T of x, then
    L_T + sum_t L_{t-1}(z_t). Memory grows with T."""
    latents = model.diffusion.forward_chain(x, generator)
    batch = x.shape[0]
    t = torch.arange(1, model.num_steps + 1, device=x.device).repeat_interleave(batch)
    terms = model.loss_terms(x.repeat(model.num_steps, 1, 1, 1), torch.cat(latents), t)
    return ObjectiveOutput(model.diffusion.prior_kl(x) + terms.view(model.num_steps, batch).sum(0))


def _draw(model: DDGM, x: torch.Tensor, sampler: UniformSampler, generator: torch.Generator | None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """t ~ p(t), its importance weights 1 / (T p(t)), eps and z_t ~ q(z_t | x)."""
    t, weights = sampler.sample(x.shape[0], device=x.device, generator=generator)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return t, weights, noise, model.diffusion.q_sample(x, t, noise)


def random_t_elbo(
    model: DDGM, x: torch.Tensor, sampler: UniformSampler, generator: torch.Generator | None = None
) -> ObjectiveOutput:
    """Unbiased -ELBO estimate with one level per example: L_T + L_{t-1} / p(t), t ~ p
    (= L_T + T L_{t-1} for uniform t). Memory does not grow with T."""
    t, weights, _, z_t = _draw(model, x, sampler, generator)
    terms = model.loss_terms(x, z_t, t)
    return ObjectiveOutput(model.diffusion.prior_kl(x) + model.num_steps * weights * terms, t, terms)


def simple_loss(
    model: EpsilonDDGM, x: torch.Tensor, sampler: UniformSampler, generator: torch.Generator | None = None
) -> ObjectiveOutput:
    """L_simple = w(t) * mean over dimensions of ||eps - eps_theta(sqrt(abar_t) x + sqrt(1-abar_t) eps, t)||^2,
    t ~ p(t), w(t) = 1 / (T p(t)) (1 for uniform t): the uniform-t L_simple under any sampler."""
    t, weights, noise, z_t = _draw(model, x, sampler, generator)
    eps, _ = model.network_output(z_t, t)
    return ObjectiveOutput(weights * ((noise - eps) ** 2).flatten(1).mean(1), t)


def hybrid_loss(
    model: EpsilonDDGM,
    x: torch.Tensor,
    sampler: UniformSampler,
    generator: torch.Generator | None = None,
    vlb_weight: float = 0.001,
) -> ObjectiveOutput:
    """L_hybrid = w(t) (L_simple + lambda T L_{t-1} / (D ln 2)), t ~ p(t), w(t) = 1 / (T p(t)):
    Nichol & Dhariwal 2021's L_simple + lambda L_vlb with L_vlb in bits per dimension (lambda = 0.001
    in the paper), its mean detached so the VLB part only trains the learned variance. The weight
    w(t) makes both parts unbiased for uniform t under any sampler, as in the paper's code."""
    t, weights, noise, z_t = _draw(model, x, sampler, generator)
    eps, interp = model.network_output(z_t, t)
    mean, log_var = model.mean_logvar_from_output(z_t, t, eps.detach(), interp)
    terms = model.terms_from_mean_logvar(x, z_t, t, mean, log_var)
    vlb_bits_per_dim = model.num_steps * terms / (x[0].numel() * math.log(2.0))
    simple = ((noise - eps) ** 2).flatten(1).mean(1)
    return ObjectiveOutput(weights * (simple + vlb_weight * vlb_bits_per_dim), t, terms)


def compute_objective(
    name: str,
    model: DDGM,
    x: torch.Tensor,
    sampler: UniformSampler,
    generator: torch.Generator | None = None,
    vlb_weight: float = 0.001,
) -> ObjectiveOutput:
    """Dispatch on the objective's name; L_simple and hybrid need an epsilon model."""
    model.check_input(x)
    if name == "full_elbo":
        return full_elbo(model, x, generator)
    if name == "random_t_elbo":
        return random_t_elbo(model, x, sampler, generator)
    if name in ("simple", "hybrid"):
        if not isinstance(model, EpsilonDDGM):
            raise ValueError(f"objective {name!r} needs the epsilon formulation, got {model.config.formulation!r}")
        if name == "simple":
            return simple_loss(model, x, sampler, generator)
        if not model.learned_variance:
            raise ValueError("objective 'hybrid' trains a learned variance: set variance to 'learned_range'")
        return hybrid_loss(model, x, sampler, generator, vlb_weight)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
