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
    """Network architecture: an MLP on flattened images or a U-Net."""

    kind: str = "unet"
    hidden_dim: int = 256
    depth: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention: bool = True
    dropout: float = 0.0


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
        if self.formulation == "article" and self.network.kind != "mlp":
            raise ValueError("network.kind must be 'mlp' for the article formulation (one MLP per level)")

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
        network = dict(values.pop("network", {}))
        _known("schedule", schedule, ScheduleConfig)
        _known("network", network, NetworkConfig)
        return cls(schedule=ScheduleConfig(**schedule), network=NetworkConfig(**network), **values)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _known(what: str, values: dict[str, Any], kind: type) -> None:
    unknown = set(values) - {f.name for f in fields(kind)}
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}")
