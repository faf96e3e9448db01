"""Figures of the article's Figure 2 and friends, drawn with matplotlib into PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from ddgm.atomic import atomic_write


def image_grid(images: torch.Tensor, columns: int = 10, pad: int = 1, background: float = 0.0) -> np.ndarray:
    """Tile [N, C, H, W] floats in [0, 1] into one [rows*(H+pad), columns*(W+pad), C] array."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), background, dtype=np.float32)
    array = images.detach().cpu().float().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = array[i]
    return grid


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def save_image_grid(images: torch.Tensor, path: str | Path, title: str, columns: int = 10) -> Path:
    """Save images (floats in [0, 1], [N, C, H, W]) as a titled grid; grayscale when C = 1."""
    grid = image_grid(images.clamp(0, 1), columns)
    fig, ax = plt.subplots(figsize=(columns * 0.6, grid.shape[0] / grid.shape[1] * columns * 0.6 + 0.5))
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray_r" if grid.shape[2] == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return _save(fig, path)


def save_trajectory(frames: Sequence[torch.Tensor], labels: Sequence[str], path: str | Path, title: str) -> Path:
    """Rows = samples, columns = the chain from z_T (left) to x (right); frames are [N, C, H, W] in [0, 1]."""
    stacked = torch.stack([f.clamp(0, 1) for f in frames], dim=1)  # [N, F, C, H, W]
    n, f = stacked.shape[:2]
    fig, axes = plt.subplots(n, f, figsize=(f * 0.7, n * 0.7 + 0.4), squeeze=False)
    for i in range(n):
        for j in range(f):
            image = stacked[i, j].permute(1, 2, 0).numpy()
            axes[i, j].imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray_r", vmin=0, vmax=1,
                              interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(labels[j], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_curve(steps: Sequence[float], values: Sequence[float], path: str | Path, title: str, ylabel: str) -> Path:
    """A validation curve (the article's Figure 2D)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, values, marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
