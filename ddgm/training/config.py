"""What params.yaml's ``train`` and ``tracking`` sections configure: ``TrainConfig`` (objective,
optimisation, validation, checkpoints, speed settings, output paths) and ``TrackingConfig`` (MLflow).

Each dataclass checks itself when it is built; an error names the params key (``train.lr``).
Checks that need more than one section (``check_objective_fits_model``) or the number of
processes (``micro_batch_size``) are functions of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddgm.config import ModelSpec, check_choice
from ddgm.objectives import OBJECTIVES
from ddgm.timestep_sampler import TIMESTEP_SAMPLERS

OPTIMIZERS = ("adamw", "adamax")
LR_DECAYS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
POSITIVE = ("lr", "max_steps", "batch_size", "grad_accum", "val_every", "val_batch_size", "val_chunk",
            "checkpoint_every", "keep_checkpoints", "log_every")
NON_NEGATIVE = ("weight_decay", "warmup_steps", "grad_clip", "vlb_weight", "num_workers", "patience", "seed")


@dataclass
class TrainConfig:
    """params.yaml ``train``: how the model is trained, validated and checkpointed, and where the
    model, checkpoints and validation curve go."""

    objective: str = "random_t_elbo"
    timestep_sampler: str = "uniform"
    uniform_mix: float = 0.001  # importance: p(t) = (1 - uniform_mix) p_importance(t) + uniform_mix / T
    vlb_weight: float = 0.001  # hybrid: lambda on the VLB in bits/dim
    optimizer: str = "adamw"
    lr: float = 0.002
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_decay: str = "cosine"
    min_lr_ratio: float = 0.1
    max_steps: int = 6000
    batch_size: int = 128  # global: over all processes and accumulation steps
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str | None = "bf16"  # None: the launcher's setting
    compile: bool = False  # torch.compile the networks of the training step (not the EMA/validation model)
    compile_mode: str = "default"
    channels_last: bool = False  # NHWC layout for the training model and its batches
    allow_tf32: bool = True  # CUDA only
    fused_optimizer: bool = True  # the fused AdamW kernel, CUDA and CPU (Adamax has none: foreach)
    pin_memory: bool = True  # CUDA only: page-locked batches copied with non_blocking=True
    seed: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 1000
    val_every: int = 300
    val_batch_size: int = 128
    val_chunk: int = 50
    val_max_images: int | None = 32  # validate on a fixed subset of about this many val images (None: all)
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 50
    model_dir: str = "models"
    checkpoint_dir: str = "checkpoints"
    curve_file: str = "plots/val_curve.tsv"

    def __post_init__(self) -> None:
        check_choice("train.objective", self.objective, OBJECTIVES)
        check_choice("train.timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.lr_decay", self.lr_decay, LR_DECAYS)
        if self.mixed_precision is not None:
            check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        for name in POSITIVE:
            _check_sign(name, getattr(self, name), strict=True)
        for name in NON_NEGATIVE:
            _check_sign(name, getattr(self, name), strict=False)
        if self.val_max_images is not None:
            _check_sign("val_max_images", self.val_max_images, strict=True)
        if not 0.0 < self.uniform_mix <= 1.0:  # rejects NaN too
            raise ValueError(f"train.uniform_mix must lie in (0, 1], got {self.uniform_mix!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("model_dir", "checkpoint_dir", "curve_file"):
            if not getattr(self, name):
                raise ValueError(f"train.{name} must be a non-empty path, got {getattr(self, name)!r}")
        self._check_timestep_sampler()

    def _check_timestep_sampler(self) -> None:
        """Importance sampling of t learns p(t) from the ELBO terms L_{t-1} of the drawn t."""
        if self.timestep_sampler == "importance" and self.objective in ("full_elbo", "simple"):
            reason = ("sums every level, so no t is drawn" if self.objective == "full_elbo"
                      else "sees no ELBO terms L_{t-1} to learn p(t) from")
            raise ValueError(f"train.timestep_sampler 'importance' draws t by the running size of the ELBO terms "
                             f"L_{{t-1}}, but train.objective {self.objective!r} {reason}: "
                             "set train.timestep_sampler to 'uniform'")


@dataclass
class TrackingConfig:
    """params.yaml ``tracking``: the MLflow store, experiment and run, and what a failure does."""

    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the project's mlflow.db
    experiment: str = "ddgm"
    run_name: str | None = None  # None: the DVC experiment's name under `dvc exp run`
    enabled: bool = True
    required: bool = False  # True: a tracking failure stops the stage (else it warns and goes on untracked)
    register_model: str | None = None  # a name: register the trained model's pyfunc as a new version of it
    system_metrics: bool | None = None  # CPU/memory/GPU use as system/* metrics; None: on when CUDA is available

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError(f"tracking.experiment must name an experiment, got {self.experiment!r}")


def check_objective_fits_model(train: TrainConfig, model: ModelSpec) -> None:
    """L_simple and the hybrid loss train an epsilon network; the hybrid loss also its variance."""
    if train.objective in ("simple", "hybrid") and model.formulation != "epsilon":
        raise ValueError(f"train.objective {train.objective!r} needs model.formulation 'epsilon', "
                         f"got {model.formulation!r}")
    if train.objective == "hybrid" and model.variance != "learned_range":
        raise ValueError(f"train.objective 'hybrid' trains a learned variance: model.variance must be "
                         f"'learned_range', got {model.variance!r}")


def micro_batch_size(train: TrainConfig, num_processes: int) -> int:
    """The per-process micro-batch: batch_size / (processes x grad_accum), which must divide evenly."""
    parts = num_processes * train.grad_accum
    if train.batch_size % parts:
        raise ValueError(f"train.batch_size={train.batch_size} is not divisible by processes x grad_accum = "
                         f"{num_processes} x {train.grad_accum}")
    return train.batch_size // parts


def _check_sign(name: str, value: float, strict: bool) -> None:
    """ValueError naming train.``name`` unless ``value`` > 0 (``strict``) or >= 0."""
    if value < 0 or (strict and value == 0):
        raise ValueError(f"train.{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")
