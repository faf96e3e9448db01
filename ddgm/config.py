"""The model's configuration: params.yaml's ``diffusion`` section (``ScheduleConfig``), its ``model``
section (``ModelSpec``) and ``ModelConfig``, which adds the data's image shape and K to them:
everything needed to rebuild a model from its JSON file.

Each dataclass checks itself when it is built; an error names the params key (``model.variance``).
``ModelConfig.from_dict`` also reads model files written before the two sections were merged in
(``schedule: {name, num_steps, params}``, ``network: {kind, ...}``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ddgm.quantization import check_num_levels
from ddgm.schedules import SCHEDULES, make_betas

FORMULATIONS = ("article", "epsilon")
VARIANCES = ("fixed_large", "fixed_small", "learned_range")
NETWORKS = ("mlp", "unet")
DECODERS = ("discretized", "continuous")
SAMPLERS = ("ancestral", "ddim")
# The parameters each beta schedule takes (null in params.yaml: the schedule's default); constant needs beta.
SCHEDULE_PARAMS = {"constant": ("beta",), "linear": ("beta_start", "beta_end", "max_beta"),
                   "cosine": ("offset", "max_beta")}


@dataclass
class ScheduleConfig:
    """params.yaml ``diffusion``: the betas of the fixed forward process
    q(z_t | z_{t-1}) = N(sqrt(1 - beta_t) z_{t-1}, beta_t I), t = 1..T (``num_steps``)."""

    schedule: str = "cosine"
    num_steps: int = 100
    beta: float | None = None  # constant
    beta_start: float | None = None  # linear (default 1e-4 x 1000/T)
    beta_end: float | None = None  # linear (default 0.02 x 1000/T)
    offset: float | None = None  # cosine s (default 0.008)
    max_beta: float | None = None  # linear and cosine clip (default 0.999)

    def __post_init__(self) -> None:
        check_choice("diffusion.schedule", self.schedule, SCHEDULES)
        takes = SCHEDULE_PARAMS[self.schedule]
        unused = [name for name in self.schedule_params() if name not in takes]
        if unused:
            raise ValueError(f"diffusion.{unused[0]} is not used by schedule {self.schedule!r} (it takes "
                             f"{', '.join(takes)}): set it to null")
        if self.schedule == "constant" and self.beta is None:
            raise ValueError("diffusion.beta must be set for schedule 'constant'")
        self.betas()  # the schedule checks its values

    def schedule_params(self) -> dict[str, float]:
        """The schedule's parameters that are set (the others take the schedule's defaults)."""
        names = (f.name for f in fields(self) if f.name not in ("schedule", "num_steps"))
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def betas(self) -> np.ndarray:
        """beta_1..beta_T in float64; a bad value is a ValueError naming its ``diffusion.`` key."""
        try:
            return make_betas(self.schedule, self.num_steps, **self.schedule_params())
        except ValueError as error:  # the schedules name their argument first: "beta must lie in ..."
            raise ValueError(f"diffusion.{error}") from None


@dataclass
class ModelSpec:
    """params.yaml ``model``: the reverse process p_theta(z_{t-1} | z_t), the article's (one MLP per
    level) or Ho et al.'s (one epsilon network shared by all t), and its network.

    ``attention_resolutions``: sides (in pixels) of the U-Net levels whose residual blocks are
    followed by self-attention; the middle block has attention whenever it is non-empty.
    """

    formulation: str = "epsilon"
    network: str = "unet"
    variance: str = "learned_range"
    decoder: str = "discretized"
    hidden_dim: int = 256  # mlp
    depth: int = 3  # mlp
    base_channels: int = 32  # unet
    channel_mults: tuple[int, ...] = (1, 2)  # unet
    num_res_blocks: int = 1  # unet
    attention_resolutions: tuple[int, ...] = ()  # unet
    dropout: float = 0.1  # unet
    norm_groups: int = 8  # unet

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        check_choice("model.formulation", self.formulation, FORMULATIONS)
        check_choice("model.network", self.network, NETWORKS)
        check_choice("model.variance", self.variance, VARIANCES)
        check_choice("model.decoder", self.decoder, DECODERS)
        for name in ("hidden_dim", "depth", "base_channels", "num_res_blocks", "norm_groups"):
            _check_positive_int(f"model.{name}", getattr(self, name))
        if not self.channel_mults or any(not _is_int(m) or m < 1 for m in self.channel_mults):
            raise ValueError(f"model.channel_mults must be integers >= 1, got {list(self.channel_mults)!r}")
        if any(not _is_int(side) or side < 1 for side in self.attention_resolutions):
            raise ValueError(f"model.attention_resolutions must be image sides >= 1, got "
                             f"{list(self.attention_resolutions)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.formulation == "article" and self.network != "mlp":
            raise ValueError(f"model.network must be 'mlp' for model.formulation 'article' (one MLP per level), "
                             f"got {self.network!r}")
        check_decoder_variance(self.decoder, self.variance)


@dataclass
class ModelConfig(ModelSpec):
    """A model: its ``model`` section, its ``diffusion`` schedule, and the image shape (C, H, W) and
    number of intensity levels K of its data (read from the data manifest)."""

    diffusion: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_shape: tuple[int, int, int] = (1, 8, 8)
    num_levels: int = 17

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_levels(self.num_levels)
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any(not _is_int(s) or s < 1 for s in shape):
            raise ValueError(f"image_shape must be three positive ints (C, H, W), got {self.image_shape!r}")
        self.image_shape = (shape[0], shape[1], shape[2])

    @classmethod
    def build(cls, spec: ModelSpec, diffusion: ScheduleConfig, image_shape: tuple[int, int, int],
              num_levels: int) -> ModelConfig:
        """The config of ``spec`` with ``diffusion`` for images of ``image_shape`` with K = ``num_levels``."""
        section = {f.name: getattr(spec, f.name) for f in fields(ModelSpec)}
        return cls(**section, diffusion=diffusion, image_shape=image_shape, num_levels=num_levels)

    @property
    def data_dim(self) -> int:
        """D = C * H * W."""
        c, h, w = self.image_shape
        return c * h * w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a (JSON) dict of ``to_dict``'s layout or the old one; unknown or missing keys are
        an error naming them."""
        values = _from_old_layout(values) if "schedule" in values else dict(values)
        _check_keys("model config", values, cls)
        diffusion = dict(values.pop("diffusion"))
        _check_keys("diffusion", diffusion, ScheduleConfig)
        return cls(diffusion=ScheduleConfig(**diffusion), **values)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_decoder_variance(decoder: str, variance: str) -> None:
    """Refuse the continuous decoder with a learned variance: its L_0 = -log N(x | mu, sigma_1^2) has
    no lower bound, since the network can drive the learned log sigma_1^2 (an unclamped
    interpolation) towards -inf while mu -> x; the discretized decoder's probabilities stay <= 1."""
    if decoder == "continuous" and variance == "learned_range":
        raise ValueError(
            "model.decoder 'continuous' cannot be combined with model.variance 'learned_range': the continuous "
            "decoder's -log density is unbounded below when the variance is learned; use model.decoder "
            "'discretized' or a fixed model.variance ('fixed_large' or 'fixed_small')"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_keys(what: str, values: dict[str, Any], kind: type) -> None:
    """ValueError unless ``values`` holds every field of ``kind`` and nothing else."""
    names = {f.name for f in fields(kind)}
    unknown, missing = sorted(set(values) - names), sorted(names - set(values))
    if unknown or missing:
        raise ValueError(f"{what}: unknown keys {unknown}, missing keys {missing}")


# The old layout's defaults, which its files relied on for keys added later.
OLD_NETWORK_DEFAULTS = {"kind": "unet", "hidden_dim": 256, "depth": 3, "base_channels": 32, "channel_mults": [1, 2],
                        "num_res_blocks": 2, "dropout": 0.0, "norm_groups": 8}
OLD_MODEL_DEFAULTS = {"formulation": "epsilon", "image_shape": [1, 8, 8], "num_levels": 17,
                      "variance": "fixed_large", "decoder": "discretized"}


def _from_old_layout(values: dict[str, Any]) -> dict[str, Any]:
    """A model file of the old layout ({formulation, ..., schedule: {name, num_steps, params},
    network: {kind, ...}}) in the new one."""
    old = dict(values)
    schedule, network = dict(old.pop("schedule")), dict(old.pop("network", {}))
    unknown = sorted((set(old) - set(OLD_MODEL_DEFAULTS)) | (set(schedule) - {"name", "num_steps", "params"}))
    if unknown:
        raise ValueError(f"model config (old layout): unknown keys {unknown}")
    network = OLD_NETWORK_DEFAULTS | _migrate_attention(network, old.get("image_shape", [1, 8, 8]))
    new = OLD_MODEL_DEFAULTS | old | {"network": network.pop("kind")} | network
    given = {"schedule": schedule.get("name", "linear"), "num_steps": schedule.get("num_steps", 1000),
             **schedule.get("params", {})}
    new["diffusion"] = dict.fromkeys(f.name for f in fields(ScheduleConfig)) | given
    return new


def _migrate_attention(network: dict[str, Any], image_shape: Any) -> dict[str, Any]:
    """Model files written before ``attention_resolutions`` hold ``attention: bool`` (self-attention at
    the lowest U-Net resolution, and in the middle block): translate it to the resolution list."""
    if "attention" not in network:
        return network | {"attention_resolutions": network.get("attention_resolutions", [])}
    if "attention_resolutions" in network:
        raise ValueError("network has both 'attention' (old files) and 'attention_resolutions'; keep only the latter")
    attention = network.pop("attention")
    mults = network.get("channel_mults", OLD_NETWORK_DEFAULTS["channel_mults"])
    lowest = int(tuple(image_shape)[-1]) // 2 ** (len(mults) - 1)
    network["attention_resolutions"] = [lowest] if attention else []
    return network
