"""Save and load a model as safetensors weights plus a JSON config; loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddgm.atomic import atomic_write
from ddgm.config import ModelConfig
from ddgm.models import DDGM, build_model


def weights_and_config_paths(path: str | Path) -> tuple[Path, Path]:
    """models/model(.safetensors|.json) -> (models/model.safetensors, models/model.json)."""
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_model(model: DDGM, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> tuple[Path, Path]:
    """Write <path>.safetensors (``state_dict`` or the model's) and <path>.json atomically."""
    weights_path, config_path = weights_and_config_paths(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    text = json.dumps(model.config.to_dict(), indent=2)
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(config_path, lambda tmp: Path(tmp).write_text(text))
    return weights_path, config_path


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored beside a model's weights."""
    _, config_path = weights_and_config_paths(path)
    try:
        return ModelConfig.from_dict(json.loads(config_path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"model config {config_path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"model config {config_path} is not valid JSON: {error}") from None


def load_model(path: str | Path, device: torch.device | str = "cpu") -> DDGM:
    """Rebuild the model from its JSON config and load its safetensors weights (strict)."""
    weights_path, _ = weights_and_config_paths(path)
    model = build_model(load_config(path))
    if not weights_path.exists():
        raise FileNotFoundError(f"model weights {weights_path} do not exist")
    tensors = load_file(str(weights_path))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights {weights_path} do not match their config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(tensors)
    return model.to(device)
