"""Classifier-based Inception Score and nearest-training-image distance of generated samples."""

from __future__ import annotations

import math

import torch

from ddgm.evaluation.checks import check_image_shape, check_levels
from ddgm.evaluation.classifier import FeatureClassifier, classify_levels
from ddgm.quantization import levels_to_unit

SAMPLE_CHUNK = 256
TRAIN_CHUNK = 4096


def inception_score(classifier: FeatureClassifier, levels: torch.Tensor, num_levels: int, splits: int = 1) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))) with p(y) = E_x p(y|x), averaged over ``splits`` contiguous
    near-equal groups of ``levels`` (each group uses its own p(y)); 1 <= IS <= num_classes.

    Written out in float64 rather than via torchmetrics' ``InceptionScore``, which permutes the
    images with the global RNG and caches every feature batch.
    """
    check_levels(levels, num_levels, "levels")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= levels.shape[0]:
        raise ValueError(f"splits must be an integer in 1..N = 1..{levels.shape[0]}, got {splits!r}")
    log_p = classify_levels(classifier, levels, num_levels).double().log_softmax(dim=1)  # log p(y|x)
    scores = []
    for group in log_p.tensor_split(splits):
        log_marginal = group.logsumexp(dim=0) - math.log(group.shape[0])  # log p(y)
        kl = (group.exp() * (group - log_marginal)).sum(dim=1)  # KL(p(y|x) || p(y))
        scores.append(kl.mean().exp())
    return torch.stack(scores).mean().item()


def nearest_neighbour_distance(
    samples_levels: torch.Tensor, train_levels: torch.Tensor, num_levels: int
) -> float:
    """Mean over samples s of min_t ||s - t||_2 over training images t, in [-1, 1] pixel space.

    A memorisation check: copies of training images give 0. The nearest t is found with
    ``torch.cdist`` (matrix-product form, batched) and its distance is then recomputed directly,
    so exact copies give exactly 0.
    """
    check_levels(samples_levels, num_levels, "samples_levels")
    check_levels(train_levels, num_levels, "train_levels")
    check_image_shape(train_levels, tuple(samples_levels.shape[1:]), "train_levels")
    device = samples_levels.device
    train = levels_to_unit(train_levels.to(device), num_levels).flatten(1)
    total = 0.0
    for chunk in samples_levels.split(SAMPLE_CHUNK):
        samples = levels_to_unit(chunk, num_levels).flatten(1)
        best_dist = torch.full((samples.shape[0],), math.inf, device=device)
        best_index = torch.zeros(samples.shape[0], dtype=torch.int64, device=device)
        for start in range(0, train.shape[0], TRAIN_CHUNK):
            dist, index = torch.cdist(samples, train[start : start + TRAIN_CHUNK]).min(dim=1)
            closer = dist < best_dist
            best_dist = torch.where(closer, dist, best_dist)
            best_index = torch.where(closer, index + start, best_index)
        total += (samples - train[best_index]).double().norm(dim=1).sum().item()
    return total / samples_levels.shape[0]
