"""The schema of params.yaml, validated before any work starts.

Sections: ``diffusion`` (schedule), ``model`` (formulation, network, variance, decoder),
``train`` (objective, optimisation, validation, checkpoints), ``sample``, ``evaluate`` and
``tracking`` (MLflow); ``data`` is read by ddgm.data.params.
OmegaConf merges each section onto a typed schema, so an unknown key or a wrong type is an
error that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddgm.config import (DECODERS, FORMULATIONS, NETWORKS, SAMPLERS, VARIANCES, ModelConfig, NetworkConfig,
                         ScheduleConfig, check_choice, check_decoder_variance)
from ddgm.objectives import OBJECTIVES
from ddgm.schedules import SCHEDULES
from ddgm.timestep_sampler import TIMESTEP_SAMPLERS

OPTIMIZERS = ("adamw", "adamax")
LR_DECAYS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DiffusionParams:
    schedule: str = "linear"
    num_steps: int = 1000
    beta: Optional[float] = None  # constant schedule
    beta_start: Optional[float] = None  # linear schedule
    beta_end: Optional[float] = None
    offset: Optional[float] = None  # cosine schedule
    max_beta: Optional[float] = None


@dataclass
class ModelParams:
    formulation: str = "epsilon"
    network: str = "unet"
    variance: str = "fixed_large"
    decoder: str = "discretized"
    hidden_dim: int = 256
    depth: int = 3
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=list)  # sides with self-attention ([] = none)
    dropout: float = 0.0
    norm_groups: int = 8


@dataclass
class TrainParams:
    objective: str = "random_t_elbo"
    timestep_sampler: str = "uniform"
    vlb_weight: float = 0.001
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_decay: str = "cosine"
    min_lr_ratio: float = 0.1
    max_steps: int = 2000
    batch_size: int = 128  # global, over all processes and accumulation steps
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: Optional[str] = None  # no | fp16 | bf16; None = the launcher's setting
    compile: bool = False  # torch.compile the network(s) of the training step (not the EMA/validation model)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | ...
    channels_last: bool = False  # NHWC layout for the training model and its input batches
    allow_tf32: bool = True  # CUDA only: TF32 matmuls/convolutions in the training step
    fused_optimizer: bool = True  # the fused AdamW kernel, CUDA and CPU (Adamax has none: foreach)
    pin_memory: bool = True  # CUDA only: page-locked batches copied with non_blocking=True
    seed: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 1000
    val_every: int = 500
    val_batch_size: int = 64
    val_chunk: int = 50
    val_max_images: Optional[int] = None  # validate on about this many val images (None = all)
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 25
    shards: str = "data/shards"
    model_dir: str = "models"
    checkpoint_dir: str = "checkpoints"
    curve_file: str = "plots/val_curve.tsv"


@dataclass
class SampleParams:
    num_samples: int = 1000
    sampler: str = "ddim"  # ddim | ancestral (the article's model: ancestral over its T levels)
    num_steps: Optional[int] = 50  # None = every level
    eta: float = 0.0
    clip_denoised: bool = True
    batch_size: int = 500
    seed: int = 0
    out_dir: str = "samples"
    figures_dir: str = "figures"


@dataclass
class EvaluateParams:
    batch_size: int = 64
    chunk: int = 50
    seed: int = 0
    classifier_epochs: int = 30
    comparison_steps: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    comparison_samples: int = 500
    metrics_file: str = "metrics.json"
    comparison_file: str = "plots/sampler_comparison.tsv"


@dataclass
class TrackingParams:
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "ddgm"
    run_name: Optional[str] = None  # default: the DVC experiment's name ($DVC_EXP_NAME) under `dvc exp run`
    enabled: bool = True
    required: bool = False  # True: a tracking failure stops the stage (else it warns and goes on untracked)
    register_model: Optional[str] = None  # a name: register the trained model's pyfunc as a new version of it
    system_metrics: Optional[bool] = None  # CPU/memory/GPU use beside the curves; None = on when CUDA is available


@dataclass
class ComputeParams:
    threads: Optional[int] = None  # torch threads per process; None = $OMP_NUM_THREADS, else a fair share of the cores


@dataclass
class PipelineParams:
    """The sections of params.yaml that training reads."""

    diffusion: DiffusionParams = field(default_factory=DiffusionParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    sample: SampleParams = field(default_factory=SampleParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    compute: ComputeParams = field(default_factory=ComputeParams)


SECTIONS = ("diffusion", "model", "train", "sample", "evaluate", "tracking", "compute")


def load_params(path: str | Path, sections: tuple[str, ...] = SECTIONS) -> PipelineParams:
    """Read and type-check the named sections of a params file (other sections are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    raw = OmegaConf.load(path)
    chosen = {name: raw[name] for name in sections if name in raw and raw[name] is not None}
    return params_from_dict(OmegaConf.to_container(OmegaConf.create(chosen)))


def params_from_dict(values: dict[str, Any]) -> PipelineParams:
    """Merge ``values`` onto the typed defaults and validate them; errors name the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineParams), values)
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid params: {error.msg if hasattr(error, 'msg') else error}") from None
    params: PipelineParams = OmegaConf.to_object(merged)
    validate_model(params)
    validate_train(params.train)
    validate_sample(params.sample)
    validate_evaluate(params.evaluate)
    return params


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"train.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate_model(params: PipelineParams) -> None:
    """The diffusion and model sections, and the objective they must suit, named as in params.yaml
    (ModelConfig checks them again, but only once the data's manifest has been read)."""
    d, m, t = params.diffusion, params.model, params.train
    check_choice("diffusion.schedule", d.schedule, SCHEDULES)
    if d.num_steps < 1:
        raise ValueError(f"diffusion.num_steps must be >= 1, got {d.num_steps!r}")
    check_choice("model.formulation", m.formulation, FORMULATIONS)
    check_choice("model.network", m.network, NETWORKS)
    check_choice("model.variance", m.variance, VARIANCES)
    check_choice("model.decoder", m.decoder, DECODERS)
    for name in ("hidden_dim", "depth", "base_channels", "num_res_blocks", "norm_groups"):
        if getattr(m, name) < 1:
            raise ValueError(f"model.{name} must be >= 1, got {getattr(m, name)!r}")
    if any(side < 1 for side in m.attention_resolutions):
        raise ValueError(f"model.attention_resolutions must be image sides >= 1, got {m.attention_resolutions!r}")
    check_decoder_variance("model.decoder", m.decoder, "model.variance", m.variance)
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout must lie in [0, 1), got {m.dropout!r}")
    if m.formulation == "article" and m.network != "mlp":
        raise ValueError(f"model.network must be 'mlp' for model.formulation 'article', got {m.network!r}")
    if t.objective in ("simple", "hybrid") and m.formulation != "epsilon":
        raise ValueError(f"train.objective {t.objective!r} needs model.formulation 'epsilon', got {m.formulation!r}")
    if t.objective == "hybrid" and m.variance != "learned_range":
        raise ValueError(f"train.objective 'hybrid' trains a learned variance: model.variance must be "
                         f"'learned_range', got {m.variance!r}")


def validate_train(train: TrainParams) -> None:
    """Checks that need no data or processes (those are in ``check_batch_layout``)."""
    check_choice("train.objective", train.objective, OBJECTIVES)
    check_choice("train.timestep_sampler", train.timestep_sampler, TIMESTEP_SAMPLERS)
    check_choice("train.optimizer", train.optimizer, OPTIMIZERS)
    check_choice("train.lr_decay", train.lr_decay, LR_DECAYS)
    if train.mixed_precision is not None:
        check_choice("train.mixed_precision", train.mixed_precision, MIXED_PRECISION)
    check_choice("train.compile_mode", train.compile_mode, COMPILE_MODES)
    if train.timestep_sampler == "importance" and train.objective in ("full_elbo", "simple"):
        reason = ("sums every level, so no t is drawn" if train.objective == "full_elbo"
                  else "sees no ELBO terms L_{t-1} to learn p(t) from")
        raise ValueError(f"train.timestep_sampler 'importance' draws t by the running size of the ELBO terms "
                         f"L_{{t-1}}, but train.objective {train.objective!r} {reason}: "
                         "set train.timestep_sampler to 'uniform'")
    for name in ("lr", "max_steps", "batch_size", "grad_accum", "val_every", "val_batch_size", "val_chunk",
                 "checkpoint_every", "keep_checkpoints", "log_every"):
        _positive(name, getattr(train, name))
    for name in ("weight_decay", "warmup_steps", "grad_clip", "vlb_weight", "num_workers", "patience", "seed"):
        _positive(name, getattr(train, name), allow_zero=True)
    if train.val_max_images is not None:
        _positive("val_max_images", train.val_max_images)
    if not 0.0 <= train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must lie in [0, 1), got {train.ema_decay!r}")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {train.min_lr_ratio!r}")


def validate_sample(sample: SampleParams) -> None:
    check_choice("sample.sampler", sample.sampler, SAMPLERS)
    for name in ("num_samples", "batch_size"):
        if getattr(sample, name) < 1:
            raise ValueError(f"sample.{name} must be >= 1, got {getattr(sample, name)!r}")
    if sample.num_steps is not None and sample.num_steps < 1:
        raise ValueError(f"sample.num_steps must be >= 1 or null, got {sample.num_steps!r}")
    if sample.eta < 0:
        raise ValueError(f"sample.eta must be >= 0, got {sample.eta!r}")


def validate_evaluate(evaluate: EvaluateParams) -> None:
    for name in ("batch_size", "chunk", "classifier_epochs", "comparison_samples"):
        if getattr(evaluate, name) < 1:
            raise ValueError(f"evaluate.{name} must be >= 1, got {getattr(evaluate, name)!r}")
    if any(steps < 1 for steps in evaluate.comparison_steps):
        raise ValueError(f"evaluate.comparison_steps must all be >= 1, got {evaluate.comparison_steps!r}")


def check_batch_layout(train: TrainParams, num_processes: int) -> int:
    """The per-process micro-batch: batch_size / (processes * grad_accum), which must divide evenly."""
    parts = num_processes * train.grad_accum
    if train.batch_size % parts:
        raise ValueError(
            f"train.batch_size={train.batch_size} is not divisible by processes x grad_accum = "
            f"{num_processes} x {train.grad_accum}"
        )
    return train.batch_size // parts


def model_config(params: PipelineParams, image_shape: tuple[int, int, int], num_levels: int) -> ModelConfig:
    """The ModelConfig for the data's image shape and K (both read from the data manifest)."""
    d, m = params.diffusion, params.model
    schedule_params = {k: getattr(d, k) for k in ("beta", "beta_start", "beta_end", "offset", "max_beta")
                       if getattr(d, k) is not None}
    network = NetworkConfig(kind=m.network, hidden_dim=m.hidden_dim, depth=m.depth, base_channels=m.base_channels,
                            channel_mults=tuple(m.channel_mults), num_res_blocks=m.num_res_blocks,
                            attention_resolutions=tuple(m.attention_resolutions), dropout=m.dropout,
                            norm_groups=m.norm_groups)
    return ModelConfig(formulation=m.formulation, image_shape=tuple(image_shape), num_levels=num_levels,
                       schedule=ScheduleConfig(d.schedule, d.num_steps, schedule_params), network=network,
                       variance=m.variance, decoder=m.decoder)
