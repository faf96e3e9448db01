"""Input validation shared by the evaluation modules: batches of integer levels [N, C, H, W]."""

from __future__ import annotations

import torch

from ddgm.quantization import check_num_levels


def check_levels(levels: torch.Tensor, num_levels: int, name: str) -> torch.Tensor:
    """Return ``levels`` if it is a non-empty integer tensor [N, C, H, W] with values in {0..K-1}."""
    check_num_levels(num_levels)
    if not isinstance(levels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(levels).__name__}")
    if levels.dim() != 4 or levels.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, C, H, W] with N >= 1, got {tuple(levels.shape)}")
    if levels.dtype == torch.bool or levels.is_floating_point() or levels.is_complex():
        raise ValueError(f"{name} must hold integer levels (e.g. uint8), got dtype {levels.dtype}")
    low, high = int(levels.min()), int(levels.max())
    if low < 0 or high > num_levels - 1:
        raise ValueError(
            f"{name} must lie in 0..{num_levels - 1} for num_levels={num_levels}, got values {low}..{high}"
        )
    return levels


def check_image_shape(levels: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    """Raise unless the per-image shape [C, H, W] of ``levels`` equals ``expected``."""
    if tuple(levels.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{name} must have images of shape [C, H, W] = {list(expected)}, got {list(levels.shape[1:])}"
        )
