"""A small sample grid drawn at each validation, so that the tracker shows samples improving beside
the curve (``Tracker.log_image``).

Cost: an epsilon model draws ``num_images`` samples with DDIM (eta = 0) over ``GRID_STEPS`` evenly
spaced levels, i.e. ``GRID_STEPS`` network calls on a batch of ``num_images``; validation evaluates
all T levels for every validation image, so the grid costs at most
``GRID_STEPS / T * num_images / val images`` of it. The article's formulation has no DDIM sampler:
it samples ancestrally over its T levels (small: the article uses T = 5 to 20).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddgm.figures import image_grid
from ddgm.models import DDGM
from ddgm.samplers import sample

GRID_STEPS = 20  # DDIM levels of the grid (fewer when the model has fewer)
MIN_TILE_SIDE = 48  # small images are enlarged (nearest neighbour) to at least this many pixels


@torch.no_grad()
def validation_grid(model: DDGM, num_images: int = 16, seed: int = 0) -> np.ndarray:
    """``num_images`` samples of ``model`` from a fixed seed (the same noise at every validation),
    tiled in a square grid: an [H, W, 3] uint8 array."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if model.config.formulation == "epsilon":
            out = sample(model, num_images, "ddim", min(GRID_STEPS, model.num_steps), 0.0, generator)
        else:
            out = sample(model, num_images, "ancestral", None, 0.0, generator)
    finally:
        model.train(was_training)
    images = ((out.images.float().clamp(-1, 1) + 1) / 2).cpu()
    scale = max(1, math.ceil(MIN_TILE_SIDE / images.shape[-1]))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    grid = image_grid(images, columns=math.ceil(math.sqrt(num_images)), pad=scale, background=1.0)
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    return np.round(grid * 255).astype(np.uint8)
