"""Reading a params file: its YAML mapping, and a mapping merged onto a typed dataclass.

OmegaConf merges the values onto the dataclass's defaults, so an unknown key or a value of the
wrong type is a ValueError naming the key (``train.lr``); the dataclass then checks its values.
This module imports no section type: the prepare stage reads its ``data`` section with it without
loading the training code (pipeline/params.py holds the whole tree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML params file (an empty file: {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"params file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"params file {path} must hold a mapping of sections, found {type(values).__name__}")
    return values


def typed(schema: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """``values`` merged onto ``schema``'s defaults, as a ``schema`` instance (which checks itself);
    ``prefix`` names the section in errors (``data.``)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]  # an instance of schema
    except ConfigKeyError as error:
        raise ValueError(f"unknown params key {prefix}{error.full_key}") from None
    except OmegaConfBaseException as error:
        reason = str(error.msg if hasattr(error, "msg") else error).splitlines()[0]
        raise ValueError(f"params key {prefix}{error.full_key}: {reason}") from None


def load_section(path: str | Path, name: str, schema: type[T]) -> T:
    """Section ``name`` of the params file ``path`` as a ``schema`` (missing or null: the defaults)."""
    section = read_params_file(path).get(name)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"params section {name} in {path} must be a mapping, found {type(section).__name__}")
    return typed(schema, section or {}, f"{name}.")
