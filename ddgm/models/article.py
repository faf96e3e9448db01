"""The article's original DDGM: one network per level, a tanh decoder, the full ELBO.

p(z_T) = N(0, I);  p(z_{t-1} | z_t) = N(mu_t(z_t), exp(logvar_t(z_t)))  from its own MLP_t;
p(x | z_1) = N(tanh(NN(z_1)), I).  Unlike the article's reference code, every level's
network is a registered submodule (so it trains), level t's network is scored against
the latent it generates (z_{t-1} from z_t), the bound uses the closed-form posterior KLs,
and sampling uses the same means as training (no extra tanh).
"""

from __future__ import annotations

import torch
from torch import nn

from ddgm.config import ModelConfig
from ddgm.models.base import DDGM
from ddgm.nets import MLP


class ArticleDDGM(DDGM):
    """T levels, networks MLP_2..MLP_T for the latent transitions and a decoder MLP for x."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        dim = config.data_dim
        # levels[t - 2] parameterises p(z_{t-1} | z_t) for t = 2..T
        self.levels = nn.ModuleList(
            MLP(dim, 2 * dim, hidden_dim=config.hidden_dim, depth=config.depth) for _ in range(self.num_steps - 1)
        )
        self.decoder = MLP(dim, dim, hidden_dim=config.hidden_dim, depth=config.depth)

    def reverse_mean_logvar(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each row to its level's network; t = 1 rows go to the decoder (unit variance)."""
        flat = z_t.flatten(1)
        mean = torch.empty_like(flat)
        log_var = torch.empty_like(flat)
        for level in torch.unique(t).tolist():
            rows = t == level
            if level == 1:
                mean[rows] = torch.tanh(self.decoder(flat[rows]))
                log_var[rows] = 0.0
            else:
                mean[rows], log_var[rows] = self.levels[level - 2](flat[rows]).chunk(2, dim=1)
        return mean.view_as(z_t), log_var.view_as(z_t)
