"""What every DDGM shares: the fixed forward diffusion, the per-level loss terms, the decoder.

A model supplies the reverse conditionals p_theta(z_{t-1} | z_t) = N(mean, exp(log_var) I)
for t = 2..T and the decoder p_theta(x | z_1) (its t = 1 case) through
``reverse_mean_logvar``; everything else (ELBO terms, likelihood, sampling) is built on it.
"""

from __future__ import annotations

import torch
from torch import nn

from ddgm.config import ModelConfig
from ddgm.diffusion import GaussianDiffusion
from ddgm.distributions import discretized_gaussian_log_likelihood, normal_kl, normal_log_density


class DDGM(nn.Module):
    """Base class: a hierarchical VAE whose posterior is the fixed diffusion of ``config.diffusion``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.diffusion = GaussianDiffusion(config.diffusion.betas())

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_steps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_shape

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is [B, C, H, W] with the configured image shape."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"expected images of shape [B, {expected}], got {list(x.shape)}")

    def reverse_mean_logvar(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of p_theta(z_{t-1} | z_t) (of p_theta(x | z_1) where t = 1)."""
        raise NotImplementedError

    def decoder_nll(
        self, x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, decoder: str | None = None
    ) -> torch.Tensor:
        """L_0 = -log p_theta(x | z_1) in nats per example (``decoder`` defaults to the config's).

        discretized: exact probability of x's intensity bin (a discrete likelihood);
        continuous: the Gaussian density (the article's objective, not comparable to bits/dim).
        """
        if (decoder or self.config.decoder) == "discretized":
            log_p = discretized_gaussian_log_likelihood(x, mean, 0.5 * log_var, self.num_levels)
        else:
            log_p = normal_log_density(x, mean, log_var)
        return -log_p.flatten(1).sum(1)

    def terms_from_mean_logvar(
        self,
        x: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        mean: torch.Tensor,
        log_var: torch.Tensor,
        decoder: str | None = None,
    ) -> torch.Tensor:
        """L_{t-1} per example (nats): KL(q(z_{t-1}|z_t,x) || p_theta(z_{t-1}|z_t)) for t >= 2, L_0 for t = 1."""
        post_mean, post_log_var = self.diffusion.q_posterior(x, z_t, t)
        kl = normal_kl(post_mean, post_log_var, mean, log_var).flatten(1).sum(1)
        rows = (t == 1).nonzero().squeeze(1)  # the decoder term only where it is used
        if rows.numel() == 0:
            return kl
        nll = self.decoder_nll(x[rows], mean[rows], log_var[rows], decoder)
        return kl.index_put((rows,), nll.to(kl.dtype))

    def loss_terms(
        self, x: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, decoder: str | None = None
    ) -> torch.Tensor:
        """L_{t-1} per example (nats) at each row's own t, with z_t ~ q(z_t | x) given."""
        mean, log_var = self.reverse_mean_logvar(z_t, t)
        return self.terms_from_mean_logvar(x, z_t, t, mean, log_var, decoder)
