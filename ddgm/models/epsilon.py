"""Ho et al. 2020: one network eps_theta(z_t, t) shared across levels, with a time embedding.

mu_theta(z_t, t) = (z_t - beta_t / sqrt(1 - abar_t) eps_theta(z_t, t)) / sqrt(alpha_t); the
variance is fixed (beta_t or beta~_t) or learned as an interpolation between their logs
(Nichol & Dhariwal 2021), in which case the network outputs 2C channels.  The decoder is
the t = 1 step itself, discretised onto the K intensity levels.
"""

from __future__ import annotations

import torch
from torch import nn

from ddgm.config import ModelConfig
from ddgm.models.base import DDGM
from ddgm.nets import MLP, UNet


class EpsilonDDGM(DDGM):
    """A DDGM whose reverse mean is given through a noise prediction eps_theta(z_t, t)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.learned_variance = config.variance == "learned_range"
        self.network = self._build_network(config)

    @staticmethod
    def _build_network(config: ModelConfig) -> nn.Module:
        channels, side, _ = config.image_shape
        out_factor = 2 if config.variance == "learned_range" else 1
        if config.network == "mlp":
            dim = config.data_dim
            return MLP(dim, out_factor * dim, hidden_dim=config.hidden_dim, depth=config.depth,
                       time_embed_dim=config.hidden_dim, zero_init_output=True)
        return UNet(channels, out_factor * channels, side, base_channels=config.base_channels,
                    channel_mults=config.channel_mults, num_res_blocks=config.num_res_blocks,
                    attention_resolutions=config.attention_resolutions, dropout=config.dropout,
                    norm_groups=config.norm_groups)

    def network_output(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps_theta(z_t, t), and the variance interpolation output v when learned (else None); v is not
        clamped (v in [-1, 1] spans log beta~_t .. log beta_t), hence no continuous decoder with it."""
        self.check_input(z_t)
        if self.config.network == "mlp":
            out = self.network(z_t.flatten(1), t).view(z_t.shape[0], -1, *z_t.shape[2:])
        else:
            out = self.network(z_t, t)
        if self.learned_variance:
            eps, interp = out.chunk(2, dim=1)
            return eps, interp
        return out, None

    def mean_logvar_from_output(
        self, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, interp: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_theta, log sigma_t^2) from the network's outputs."""
        mean = self.diffusion.mean_from_eps(z_t, t, eps)
        return mean, self.diffusion.reverse_log_variance(self.config.variance, t, z_t, interp)

    def reverse_mean_logvar(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean_logvar_from_output(z_t, t, *self.network_output(z_t, t))
