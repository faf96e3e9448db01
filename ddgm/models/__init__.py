"""DDGM models and the factory that builds one from its config."""

from ddgm.config import ModelConfig
from ddgm.models.article import ArticleDDGM
from ddgm.models.base import DDGM
from ddgm.models.epsilon import EpsilonDDGM


def build_model(config: ModelConfig) -> DDGM:
    """The model class named by ``config.formulation``, freshly initialised."""
    return ArticleDDGM(config) if config.formulation == "article" else EpsilonDDGM(config)


__all__ = ["DDGM", "ArticleDDGM", "EpsilonDDGM", "ModelConfig", "build_model"]
