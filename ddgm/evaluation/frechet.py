"""Frechet distance between real and generated images in the feature space of a ``FeatureClassifier``.

FD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), with mean mu and covariance S of the
penultimate features phi(x) of each set (FID with the digit classifier in place of Inception v3).
Computed by ``torchmetrics``' ``FrechetInceptionDistance`` with a custom feature extractor, in float64.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ddgm.evaluation.checks import check_image_shape, check_levels
from ddgm.evaluation.classifier import EVAL_BATCH_SIZE, FeatureClassifier, eval_mode, module_device
from ddgm.quantization import levels_to_unit


class LevelFeatures(nn.Module):
    """Adapter for torchmetrics: integer levels [N, C, H, W] -> float64 features phi(levels_to_unit(x))."""

    def __init__(self, classifier: FeatureClassifier, num_levels: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_levels = num_levels
        self.num_features = classifier.feature_dim  # read by torchmetrics instead of probing a dummy input

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(levels_to_unit(levels, self.num_levels)).double()


def frechet_distance(
    classifier: FeatureClassifier, real_levels: torch.Tensor, fake_levels: torch.Tensor, num_levels: int
) -> float:
    """Frechet distance between the classifier features of ``real_levels`` and ``fake_levels`` (each
    [N, C, H, W] integer levels in {0..K-1}, N >= 2); round-off below 0 is clamped to 0."""
    for name, levels in (("real_levels", real_levels), ("fake_levels", fake_levels)):
        check_levels(levels, num_levels, name)
        check_image_shape(levels, classifier.image_shape, name)
        if levels.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images for a covariance, got {levels.shape[0]}")
    device = module_device(classifier)
    # A fresh metric per call, so the cached real statistics are never reused across calls; the
    # inputs reach the adapter unchanged (normalize only matters for torchmetrics' own Inception).
    metric = FrechetInceptionDistance(
        feature=LevelFeatures(classifier, num_levels), reset_real_features=True, normalize=False
    ).to(device)
    with eval_mode(classifier):
        for levels, real in ((real_levels, True), (fake_levels, False)):
            for chunk in levels.split(EVAL_BATCH_SIZE):
                metric.update(chunk.to(device), real=real)
        return max(metric.compute().item(), 0.0)
