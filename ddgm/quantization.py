"""Mapping between K discrete intensity levels {0, ..., K-1} and the model's range [-1, 1].

Level v maps to x = 2 v / (K - 1) - 1, so neighbouring levels are 2 / (K - 1) apart
(the bin width of the discretized decoder).
"""

from __future__ import annotations

import torch


def check_num_levels(num_levels: int) -> int:
    """Return ``num_levels`` if it is a valid number of intensity levels (an int >= 2)."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels (K) must be an integer >= 2, got {num_levels!r}")
    return num_levels


def levels_to_unit(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Integer levels in {0..K-1} (any integer dtype) -> float32 in [-1, 1]."""
    check_num_levels(num_levels)
    return levels.to(torch.float32) * (2.0 / (num_levels - 1)) - 1.0


def unit_to_levels(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Floats in (about) [-1, 1] -> nearest level in {0..K-1} as uint8 (K <= 256) or int64."""
    check_num_levels(num_levels)
    levels = torch.round((x.clamp(-1.0, 1.0) + 1.0) * (num_levels - 1) / 2.0)
    return levels.to(torch.uint8 if num_levels <= 256 else torch.int64)
