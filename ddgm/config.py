"""The model configuration: everything needed to rebuild a model from its JSON file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ddgm.quantization import check_num_levels
from ddgm.schedules import SCHEDULES, check_num_steps

FORMULATIONS = ("article", "epsilon")
VARIANCES = ("fixed_large", "fixed_small", "learned_range")
NETWORKS = ("mlp", "unet")
DECODERS = ("discretized", "continuous")
SAMPLERS = ("ancestral", "ddim")


@dataclass
class ScheduleConfig:
    """beta schedule name, T, and the schedule's own parameters (beta, beta_start/end, offset, max_beta)."""

    name: str = "linear"
    num_steps: int = 1000
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class NetworkConfig:
    """Network architecture: an MLP on flattened images or a U-Net (see ddgm.nets.UNet).

    ``attention_resolutions``: sides (in pixels) of the U-Net levels whose residual blocks are
    followed by self-attention; the middle block has attention whenever it is non-empty.
    """

    kind: str = "unet"
    hidden_dim: int = 256
    depth: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    norm_groups: int = 8


@dataclass
class ModelConfig:
    """A DDGM: the article's (one network per level) or Ho et al.'s (shared epsilon network)."""

    formulation: str = "epsilon"
    image_shape: tuple[int, int, int] = (1, 8, 8)
    num_levels: int = 17
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    variance: str = "fixed_large"
    decoder: str = "discretized"

    def __post_init__(self) -> None:
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_choice("variance", self.variance, VARIANCES)
        check_choice("decoder", self.decoder, DECODERS)
        check_choice("schedule.name", self.schedule.name, SCHEDULES)
        check_choice("network.kind", self.network.kind, NETWORKS)
        check_num_levels(self.num_levels)
        check_num_steps(self.schedule.num_steps)
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"image_shape must be three positive ints (C, H, W), got {self.image_shape!r}")
        self.image_shape = shape
        self.network.channel_mults = tuple(self.network.channel_mults)
        self.network.attention_resolutions = tuple(self.network.attention_resolutions)
        if self.formulation == "article" and self.network.kind != "mlp":
            raise ValueError("network.kind must be 'mlp' for the article formulation (one MLP per level)")
        check_decoder_variance("decoder", self.decoder, "variance", self.variance)

    @property
    def data_dim(self) -> int:
        """D = C * H * W."""
        c, h, w = self.image_shape
        return c * h * w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a (JSON) dict; unknown keys are an error naming them."""
        values = dict(values)
        _known("model config", values, cls)
        schedule = dict(values.pop("schedule", {}))
        network = _migrate_attention(dict(values.pop("network", {})), values.get("image_shape", cls.image_shape))
        _known("schedule", schedule, ScheduleConfig)
        _known("network", network, NetworkConfig)
        return cls(schedule=ScheduleConfig(**schedule), network=NetworkConfig(**network), **values)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_decoder_variance(decoder_key: str, decoder: str, variance_key: str, variance: str) -> None:
    """Refuse the continuous decoder with a learned variance: its L_0 = -log N(x | mu, sigma_1^2) has
    no lower bound, since the network can drive the learned log sigma_1^2 (an unclamped
    interpolation) towards -inf while mu -> x; the discretized decoder's probabilities stay <= 1."""
    if decoder == "continuous" and variance == "learned_range":
        raise ValueError(
            f"{decoder_key} 'continuous' cannot be combined with {variance_key} 'learned_range': the continuous "
            f"decoder's -log density is unbounded below when the variance is learned; use {decoder_key} "
            f"'discretized' or a fixed {variance_key} ('fixed_large' or 'fixed_small')"
        )


def _migrate_attention(network: dict[str, Any], image_shape: Any) -> dict[str, Any]:
    """Model files written before ``attention_resolutions`` hold ``attention: bool`` (self-attention at
    the lowest U-Net resolution, and in the middle block): translate it to the resolution list."""
    if "attention" not in network:
        return network
    if "attention_resolutions" in network:
        raise ValueError("network has both 'attention' (old files) and 'attention_resolutions'; keep only the latter")
    attention = network.pop("attention")
    mults = network.get("channel_mults", NetworkConfig.channel_mults)
    lowest = int(tuple(image_shape)[-1]) // 2 ** (len(mults) - 1)
    network["attention_resolutions"] = [lowest] if attention else []
    return network


def _known(what: str, values: dict[str, Any], kind: type) -> None:
    unknown = set(values) - {f.name for f in fields(kind)}
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}")
