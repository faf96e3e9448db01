"""Weak likelihood references: the independent per-pixel categorical model and the uniform model."""

from __future__ import annotations

import math

import torch

from ddgm.evaluation.checks import check_image_shape, check_levels
from ddgm.quantization import check_num_levels


def uniform_bits_per_dim(num_levels: int) -> float:
    """Bits per dimension of the uniform distribution over K levels: log2 K."""
    return math.log2(check_num_levels(num_levels))


class PixelCategorical:
    """p(x) = prod_d p_d(x_d): an independent categorical over the K levels for every dimension d = (c, h, w)."""

    def __init__(self, probs: torch.Tensor) -> None:
        """``probs`` [C, H, W, K]: per-dimension level probabilities, each row positive and summing to 1."""
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[-1] < 2:
            shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ValueError(f"probs must be a tensor [C, H, W, K] with K >= 2, got {shape}")
        if not probs.is_floating_point() or bool((probs <= 0).any()):
            raise ValueError("probs must be floating point and strictly positive")
        if not torch.allclose(probs.sum(dim=-1), torch.ones((), dtype=probs.dtype, device=probs.device)):
            raise ValueError("probs must sum to 1 over the last (level) dimension")
        self.probs = probs.to(torch.float64)
        self.num_levels = probs.shape[-1]

    @classmethod
    def fit(cls, levels: torch.Tensor, num_levels: int, alpha: float = 1.0) -> PixelCategorical:
        """Additively smoothed frequencies p_d(k) = (n_d(k) + alpha) / (N + K alpha) of levels [N, C, H, W]."""
        check_levels(levels, num_levels, "levels")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        one_hot = torch.nn.functional.one_hot(levels.to(torch.int64), num_levels)  # [N, C, H, W, K]
        counts = one_hot.sum(dim=0).to(torch.float64)
        return cls((counts + alpha) / (levels.shape[0] + num_levels * alpha))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-image shape (C, H, W)."""
        channels, height, width, _ = self.probs.shape
        return channels, height, width

    def log_prob_bits_per_dim(self, levels: torch.Tensor) -> float:
        """Mean negative log2-likelihood per dimension: -1/(N D) sum_n sum_d log2 p_d(x_{n,d})."""
        check_levels(levels, self.num_levels, "levels")
        check_image_shape(levels, self.image_shape, "levels")
        log_probs = self.probs.log().to(levels.device)  # [C, H, W, K]
        index = levels.to(torch.int64).unsqueeze(-1)  # [N, C, H, W, 1]
        picked = log_probs.expand(levels.shape[0], *log_probs.shape).gather(-1, index)
        return (-picked.mean() / math.log(2.0)).item()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` independent images [n, C, H, W] of levels (uint8 if K <= 256), drawn on the generator's device."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        flat = self.probs.to(generator.device).reshape(-1, self.num_levels)  # [D, K]
        draws = torch.multinomial(flat, n, replacement=True, generator=generator)  # [D, n]
        dtype = torch.uint8 if self.num_levels <= 256 else torch.int64
        return draws.t().reshape(n, *self.image_shape).to(dtype)
