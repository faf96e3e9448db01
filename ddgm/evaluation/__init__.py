"""Sample-quality evaluation: classifier features, Frechet distance, Inception Score, memorisation
check and weak likelihood baselines. Images are integer levels [N, C, H, W] in {0..K-1}."""

from ddgm.evaluation.baselines import PixelCategorical, uniform_bits_per_dim
from ddgm.evaluation.classifier import FeatureClassifier, accuracy, train_classifier
from ddgm.evaluation.frechet import frechet_distance
from ddgm.evaluation.scores import inception_score, nearest_neighbour_distance

__all__ = [
    "FeatureClassifier",
    "PixelCategorical",
    "accuracy",
    "frechet_distance",
    "inception_score",
    "nearest_neighbour_distance",
    "train_classifier",
    "uniform_bits_per_dim",
]
