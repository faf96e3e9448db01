"""The schema of params.yaml: one typed tree of its sections, loaded and checked before any work.

Every key is defined once, with its type, default and check, by the dataclass of its section:

| section | type | read by |
|---|---|---|
| ``data`` | ``ddgm.data.params.DataParams`` | prepare; train, sample, evaluate: ``out_dir`` |
| ``diffusion`` | ``ddgm.config.ScheduleConfig`` | train |
| ``model`` | ``ddgm.config.ModelSpec`` | train |
| ``train`` | ``ddgm.training.config.TrainConfig`` | train; sample, evaluate: its paths |
| ``sample`` | ``SampleParams`` (here) | sample, evaluate |
| ``evaluate`` | ``EvaluateParams`` (here) | evaluate |
| ``tracking`` | ``ddgm.training.config.TrackingConfig`` | train, sample, evaluate |
| ``compute`` | ``ComputeParams`` (here) | train, sample, evaluate (their threads) |

The defaults are params.yaml's values (tests/test_params.py checks both ways). A preset
(presets/*.yaml) holds only the keys it changes: ``apply_preset`` merges it onto a params file's
values (``python -m pipeline.presets``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddgm.config import SAMPLERS, ModelSpec, ScheduleConfig, check_choice
from ddgm.data.params import DataParams
from ddgm.training.config import TrackingConfig, TrainConfig, check_objective_fits_model
from pipeline.params_file import read_params_file, typed


@dataclass
class SampleParams:
    """params.yaml ``sample``: the samples and figures of the sample stage."""

    num_samples: int = 1000
    sampler: str = "ancestral"  # ddim | ancestral (the article's model: ancestral over its T levels)
    num_steps: int | None = 50  # None: every level
    eta: float = 0.0
    clip_denoised: bool = True
    batch_size: int = 500
    seed: int = 0
    out_dir: str = "samples"
    figures_dir: str = "figures"

    def __post_init__(self) -> None:
        check_choice("sample.sampler", self.sampler, SAMPLERS)
        for name in ("num_samples", "batch_size"):
            _check_positive(f"sample.{name}", getattr(self, name))
        if self.num_steps is not None:
            _check_positive("sample.num_steps", self.num_steps)
        if self.eta < 0:
            raise ValueError(f"sample.eta must be >= 0, got {self.eta!r}")


@dataclass
class EvaluateParams:
    """params.yaml ``evaluate``: exact bits/dim, sample quality and the sampler comparison."""

    batch_size: int = 128
    chunk: int = 50
    seed: int = 0
    classifier_epochs: int = 30
    comparison_steps: tuple[int, ...] = (10, 25, 50, 100)
    comparison_samples: int = 500
    metrics_file: str = "metrics.json"
    comparison_file: str = "plots/sampler_comparison.tsv"

    def __post_init__(self) -> None:
        self.comparison_steps = tuple(self.comparison_steps)
        for name in ("batch_size", "chunk", "classifier_epochs", "comparison_samples"):
            _check_positive(f"evaluate.{name}", getattr(self, name))
        if any(steps < 1 for steps in self.comparison_steps):
            raise ValueError(f"evaluate.comparison_steps must all be >= 1, got {list(self.comparison_steps)!r}")


@dataclass
class ComputeParams:
    """params.yaml ``compute``: not a DVC dependency (changing it reruns nothing)."""

    threads: int | None = None  # torch threads per process; None: $OMP_NUM_THREADS, else a share of the cores

    def __post_init__(self) -> None:
        if self.threads is not None:
            _check_positive("compute.threads", self.threads)


# The pipeline's cosine schedule (README: "Ablations"; the library's ScheduleConfig keeps the
# paper's s = 0.008 and max_beta = 0.999). Offset s = 0.05 starts the diffusion at sigma_1 = 0.050
# instead of 0.025 for T=100, 0.4 of the gap between two of 17 levels in [-1, 1]: the discretized
# decoder then carries the last bits and the test -ELBO on digits falls from 2.02 to 1.84 bits/dim.
# max_beta = 0.99 clips beta_T (the cosine's last beta is 1) at 0.99 instead of 0.999: the mean of
# p(z_{T-1} | z_T) is (z_T - beta_T / sqrt(1 - abar_T) eps) / sqrt(1 - beta_T), so the network's
# error in eps at t = T is amplified 10x instead of 32x (abar_T is still 2e-6: the prior term stays 0).
DIGITS_COSINE_OFFSET = 0.05
DIGITS_COSINE_MAX_BETA = 0.99


@dataclass
class PipelineParams:
    """All of params.yaml."""

    data: DataParams = field(default_factory=DataParams)
    diffusion: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(offset=DIGITS_COSINE_OFFSET,
                                                                                  max_beta=DIGITS_COSINE_MAX_BETA))
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleParams = field(default_factory=SampleParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compute: ComputeParams = field(default_factory=ComputeParams)

    def __post_init__(self) -> None:
        check_objective_fits_model(self.train, self.model)


def params_from_dict(values: dict[str, Any]) -> PipelineParams:
    """``values`` ({section: {key: value}}) merged onto the defaults and checked; errors name the key.
    A section that is null takes its defaults."""
    for section, entries in values.items():
        if entries is not None and not isinstance(entries, dict):
            raise ValueError(f"params section {section} must be a mapping, found {type(entries).__name__}")
    return typed(PipelineParams, {section: entries for section, entries in values.items() if entries is not None})


def load_params(path: str | Path, preset: str | Path | None = None) -> PipelineParams:
    """The params file ``path`` (with the keys of the ``preset`` file set), merged onto the defaults and
    checked; errors name the key."""
    values = read_params_file(path)
    return params_from_dict(values if preset is None else apply_preset(values, read_params_file(preset)))


def apply_preset(values: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with the keys of ``preset`` ({section: {key: value}}) set to its values."""
    merged = copy.deepcopy(values)
    for section, changes in preset.items():
        if not isinstance(changes, dict):
            raise ValueError(f"preset section {section} must be a mapping, found {type(changes).__name__}")
        merged.setdefault(section, {}).update(copy.deepcopy(changes))
    return merged


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
