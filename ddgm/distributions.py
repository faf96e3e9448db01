"""Densities and divergences of diagonal Gaussians, and the discretized Gaussian decoder.

All functions are elementwise; callers sum over data dimensions.
"""

from __future__ import annotations

import math

import torch

from ddgm.quantization import check_num_levels

LOG_2PI = math.log(2.0 * math.pi)


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) in nats:
    0.5 * (log var2 - log var1 + var1/var2 + (mean1 - mean2)^2 / var2 - 1)."""
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0
    )


def normal_log_density(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x | mean, var) = -0.5 * (log 2 pi + log var + (x - mean)^2 / var)."""
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


_TAIL = -1e4  # below this, log Phi uses its asymptotic series (see _log_ndtr)


def _log_ndtr(z: torch.Tensor) -> torch.Tensor:
    """log Phi(z). torch.special.log_ndtr's gradient breaks down far in the lower tail (wrong
    beyond |z| ~ 1e6, inf or NaN beyond ~ 1e9), so for z < -1e4 this uses the asymptotic
    series -z^2/2 - log(-z) - log(2 pi)/2 + log1p(-1/z^2), exact to float64 round-off there."""
    tail = z < _TAIL
    z_tail = torch.where(tail, z, torch.full_like(z, _TAIL))
    z_body = torch.where(tail, torch.zeros_like(z), z)
    series = -0.5 * z_tail**2 - torch.log(-z_tail) - 0.5 * LOG_2PI + torch.log1p(-(z_tail**-2))
    return torch.where(tail, series, torch.special.log_ndtr(z_body))


def _log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised bounds lower < upper, stable in both tails.

    log(Phi(b) - Phi(a)) = log Phi(b) + log1p(-exp(log Phi(a) - log Phi(b))); for a > 0 the
    mirrored form Phi(-a) - Phi(-b) avoids cancellation. Each branch only sees inputs that are
    valid for it, so neither produces NaN gradients where the other one is selected.
    """
    mirrored = lower > 0
    a = torch.where(mirrored, torch.zeros_like(lower), lower)
    b = upper
    direct = _log_ndtr(b) + torch.log1p(-torch.exp(_log_ndtr(a) - _log_ndtr(b)))
    a_m = torch.where(mirrored, lower, torch.zeros_like(lower))
    b_m = torch.where(mirrored, upper, torch.ones_like(upper))
    flipped = _log_ndtr(-a_m) + torch.log1p(
        -torch.exp(_log_ndtr(-b_m) - _log_ndtr(-a_m))
    )
    return torch.where(mirrored, flipped, direct)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, num_levels: int
) -> torch.Tensor:
    """log P(x) for x on the K-level grid of [-1, 1] under a Gaussian discretised into bins.

    P(x) = Phi((x + h - mean)/scale) - Phi((x - h - mean)/scale), h = 1/(K-1) (half the bin
    width 2/(K-1)); the lowest bin extends to -inf and the highest to +inf, so the K
    probabilities sum to one. Computed in float64 and returned in the dtype of ``mean``.
    """
    check_num_levels(num_levels)
    half_bin = 1.0 / (num_levels - 1)
    x64, mean64, inv_scale = x.double(), mean.double(), torch.exp(-log_scale.double())
    lower = torch.where(x64 <= -1.0 + 1e-6, torch.full_like(x64, -math.inf), (x64 - half_bin - mean64) * inv_scale)
    upper = torch.where(x64 >= 1.0 - 1e-6, torch.full_like(x64, math.inf), (x64 + half_bin - mean64) * inv_scale)
    return _log_normal_mass(lower, upper).to(mean.dtype)
