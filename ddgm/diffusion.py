"""The fixed Gaussian forward diffusion (the DDGM's variational posterior) in closed form.

Levels are indexed t = 0..T with z_0 = x; every coefficient table has T+1 entries so
that formulas read as in the paper (abar[0] = 1, beta[0] = 0). Timesteps are 1-indexed
long tensors of shape [B].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddgm.distributions import normal_kl


def _broadcast(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] reshaped to broadcast against ``like`` ([B, ...])."""
    return table[t].reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class GaussianDiffusion(nn.Module):
    """q(z_t | z_{t-1}) = N(sqrt(alpha_t) z_{t-1}, beta_t I) with its marginals and posteriors.

    Coefficients are computed in float64 and stored once as float32 buffers (not saved in
    checkpoints: they are a function of the schedule in the model config).
    """

    # float32 tables indexed by t = 0..T (registered as buffers in __init__)
    beta: torch.Tensor
    alpha: torch.Tensor
    abar: torch.Tensor
    abar_prev: torch.Tensor
    sqrt_abar: torch.Tensor
    sqrt_one_minus_abar: torch.Tensor
    posterior_var: torch.Tensor
    posterior_log_var_clipped: torch.Tensor
    posterior_coef_x: torch.Tensor
    posterior_coef_z: torch.Tensor
    log_beta: torch.Tensor

    def __init__(self, betas: np.ndarray):
        super().__init__()
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a non-empty 1-D array with every beta_t in (0, 1)")
        self.num_steps = int(betas.size)
        beta = np.concatenate([[0.0], betas])
        alpha = 1.0 - beta
        abar = np.cumprod(alpha)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        # posterior q(z_{t-1} | z_t, x): beta~_t and the two mean coefficients (t >= 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            post_var = np.where(np.arange(beta.size) > 0, (1.0 - abar_prev) / (1.0 - abar) * beta, 0.0)
            coef_x = np.where(np.arange(beta.size) > 0, np.sqrt(abar_prev) * beta / (1.0 - abar), 1.0)
            coef_z = np.where(np.arange(beta.size) > 0, np.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar), 0.0)
        # log beta~_t is -inf at t = 1 (beta~_1 = 0); the clipped table uses beta~_2 there
        # (beta_1 when T = 1), as a reverse-process variance must be positive.
        clip_first = post_var[2] if self.num_steps > 1 else beta[1]
        post_var_clipped = np.concatenate([[clip_first], [clip_first], post_var[2:]])
        tables = {
            "beta": beta,
            "alpha": alpha,
            "abar": abar,
            "abar_prev": abar_prev,
            "sqrt_abar": np.sqrt(abar),
            "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
            "posterior_var": post_var,
            "posterior_log_var_clipped": np.log(post_var_clipped),
            "posterior_coef_x": coef_x,
            "posterior_coef_z": coef_z,
            "log_beta": np.log(np.where(beta > 0, beta, 1.0)),
        }
        for name, values in tables.items():
            self.register_buffer(name, torch.from_numpy(values).float(), persistent=False)
        self.abar64 = abar  # float64 abar_0..abar_T, for respacing onto a subset of steps

    # -- forward process -------------------------------------------------------------------
    def q_step_sample(self, z_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps: one step of q(z_t | z_{t-1})."""
        alpha, beta = _broadcast(self.alpha, t, z_prev), _broadcast(self.beta, t, z_prev)
        return torch.sqrt(alpha) * z_prev + torch.sqrt(beta) * noise

    def q_marginal(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean sqrt(abar_t) x and variance (1 - abar_t) of q(z_t | x)."""
        # from the sqrt(1 - abar) table: 1 - abar of the float32 abar table cancels at small t
        return _broadcast(self.sqrt_abar, t, x) * x, _broadcast(self.sqrt_one_minus_abar, t, x) ** 2

    def q_sample(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, sampled without the intermediate steps."""
        return _broadcast(self.sqrt_abar, t, x) * x + _broadcast(self.sqrt_one_minus_abar, t, x) * noise

    def forward_chain(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """[z_1, ..., z_T] by iterating q(z_t | z_{t-1}) from z_0 = x (the article's sample_diffusion)."""
        latents, z = [], x
        for step in range(1, self.num_steps + 1):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            z = self.q_step_sample(z, t, noise)
            latents.append(z)
        return latents

    def q_posterior(self, x: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean mu~_t = c_x x + c_z z_t and log variance log beta~_t of q(z_{t-1} | z_t, x).

        At t = 1 the posterior is a point mass at x (beta~_1 = 0); its log variance is
        returned clipped to log beta~_2 there, which only the t >= 2 KL terms ever read.
        """
        mean = _broadcast(self.posterior_coef_x, t, x) * x + _broadcast(self.posterior_coef_z, t, z_t) * z_t
        return mean, _broadcast(self.posterior_log_var_clipped, t, x)

    def prior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(z_T | x) || N(0, I)) in nats per example (no parameters)."""
        t = torch.full((x.shape[0],), self.num_steps, device=x.device, dtype=torch.long)
        mean, var = self.q_marginal(x, t)
        zero = torch.zeros((), device=x.device, dtype=mean.dtype)  # N(0, I), broadcast
        return normal_kl(mean, torch.log(var), zero, zero).flatten(1).sum(1)

    # -- epsilon parameterisation ---------------------------------------------------------
    def x0_from_eps(self, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (z_t - _broadcast(self.sqrt_one_minus_abar, t, z_t) * eps) / _broadcast(self.sqrt_abar, t, z_t)

    def eps_from_x0(self, z_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (z_t - sqrt(abar_t) x) / sqrt(1 - abar_t)."""
        return (z_t - _broadcast(self.sqrt_abar, t, z_t) * x0) / _broadcast(self.sqrt_one_minus_abar, t, z_t)

    def mean_from_eps(self, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """mu_theta(z_t, t) = (z_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
        beta = _broadcast(self.beta, t, z_t)
        sqrt_one_minus_abar = _broadcast(self.sqrt_one_minus_abar, t, z_t)
        return (z_t - beta / sqrt_one_minus_abar * eps) / torch.sqrt(_broadcast(self.alpha, t, z_t))

    def reverse_log_variance(self, kind: str, t: torch.Tensor, like: torch.Tensor,
                             interp: torch.Tensor | None = None) -> torch.Tensor:
        """log sigma_t^2 of p_theta(z_{t-1} | z_t).

        fixed_large: log beta_t (beta~_2 at t = 1); fixed_small: log beta~_t (clipped at t = 1);
        learned_range: v log beta_t + (1 - v) log beta~_t with v = (interp + 1) / 2 (Nichol & Dhariwal).
        """
        small = _broadcast(self.posterior_log_var_clipped, t, like)
        if kind == "fixed_small":
            return small.expand_as(like)
        if kind == "fixed_large":
            large_table = torch.cat([self.posterior_log_var_clipped[:2], self.log_beta[2:]])
            return _broadcast(large_table, t, like).expand_as(like)
        if kind == "learned_range":
            if interp is None:
                raise ValueError("variance 'learned_range' needs the network's interpolation output")
            frac = (interp + 1.0) / 2.0
            return frac * _broadcast(self.log_beta, t, like) + (1.0 - frac) * small
        raise ValueError(f"variance must be one of ('fixed_large', 'fixed_small', 'learned_range'), got {kind!r}")
