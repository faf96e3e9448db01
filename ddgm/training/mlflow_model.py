"""A trained DDGM as an MLflow model: a models-from-code pyfunc whose ``predict`` draws samples.

Nothing is pickled. The logged model holds the safetensors weights and JSON config
(``artifacts/``), the code file ``mlflow_model_code.py`` that hands MLflow a ``DDGMSampler``,
and a copy of the ``ddgm`` package (``code/``), so it loads wherever torch, numpy and
safetensors are installed: ``mlflow.pyfunc.load_model(uri).predict({"num_samples": 4, "seed": 0})``
returns uint8 levels [N, C, H, W] (int64 when K > 256), the same for the same request.

Input: one row (a DataFrame or a dict) with any of the columns of ``SamplingRequest``; a
missing or null value takes its default (MLflow drops, with a warning, columns the signature
does not name before ``predict`` sees them). The device is the model config's ``device``
(``cpu`` unless ``load_model(uri, model_config={"device": "cuda"})``); a seed's samples
depend on the device.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

import ddgm
from ddgm.config import SAMPLERS, ModelConfig
from ddgm.models import DDGM
from ddgm.samplers import sample_levels
from ddgm.serialization import load_config, load_model, weights_and_config_paths

CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
MAX_SAMPLES = 10_000
REQUIREMENTS = ("mlflow", "torch", "numpy", "safetensors")
EXAMPLE_STEPS = 10


@dataclass(frozen=True)
class SamplingRequest:
    """One predict call. num_steps None: every level. Samples are drawn ``batch_size`` at a time from
    one generator seeded with ``seed`` (as the sample stage draws them)."""

    num_samples: int = 16
    sampler: str = "ancestral"
    num_steps: int | None = None
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 500
    clip_denoised: bool = True


COLUMN_TYPES = {"num_samples": DataType.long, "sampler": DataType.string, "num_steps": DataType.long,
                "eta": DataType.double, "seed": DataType.long, "batch_size": DataType.long,
                "clip_denoised": DataType.boolean}


def _bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _is_missing(value: Any) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _coerce(name: str, value: Any, kind: DataType) -> Any:
    """``value`` as the Python type of column ``name`` (integral floats count as ints)."""
    is_bool = isinstance(value, (bool, np.bool_))
    if kind == DataType.string and isinstance(value, str):
        return value
    if kind == DataType.boolean and is_bool:
        return bool(value)
    if kind in (DataType.long, DataType.double) and isinstance(value, numbers.Real) and not is_bool:
        if kind == DataType.double:
            return float(value)
        if math.isfinite(value) and float(value).is_integer():
            return int(float(value))
    raise _bad(f"input {name} must be a {kind.name}, got {value!r}")


def parse_request(model_input: pd.DataFrame | Mapping[str, Any]) -> SamplingRequest:
    """The SamplingRequest of a one-row DataFrame or a dict (empty: every default); unknown columns are an error."""
    if isinstance(model_input, pd.DataFrame):
        frame = pd.DataFrame([{}]) if model_input.shape == (0, 0) else model_input  # empty: every default
        if len(frame) != 1:
            raise _bad(f"the input must be one row (one request), got {len(frame)} rows")
        row = {str(k): v for k, v in frame.iloc[0].to_dict().items()}
    elif isinstance(model_input, Mapping):
        row = dict(model_input)
    else:
        raise _bad(f"the input must be a one-row DataFrame or a dict, got {type(model_input).__name__}")
    unknown = sorted(set(row) - set(COLUMN_TYPES))
    if unknown:
        raise _bad(f"unknown inputs {unknown}; known: {list(COLUMN_TYPES)}")
    values = {k: _coerce(k, v, COLUMN_TYPES[k]) for k, v in row.items() if not _is_missing(v)}
    request = SamplingRequest(**values)
    if not 1 <= request.num_samples <= MAX_SAMPLES:
        raise _bad(f"num_samples must lie in [1, {MAX_SAMPLES}], got {request.num_samples}")
    if request.batch_size < 1 or request.seed < 0:
        raise _bad(f"batch_size must be >= 1 and seed >= 0, got {request.batch_size} and {request.seed}")
    if not request.eta >= 0:  # rejects NaN too; checked for every sampler, as the sample stage does
        raise _bad(f"eta must be >= 0, got {request.eta}")
    if request.sampler not in SAMPLERS:
        raise _bad(f"sampler must be one of {SAMPLERS}, got {request.sampler!r}")
    return request


def draw_levels(model: DDGM, request: SamplingRequest) -> torch.Tensor:
    """request.num_samples samples as integer levels, batch by batch from one seeded generator."""
    return sample_levels(model, request.num_samples, request.sampler,
                         request.num_steps, request.eta, request.seed, request.batch_size, request.clip_denoised)


class DDGMSampler(PythonModel):
    """The pyfunc: ``load_context`` rebuilds the model from the ``weights`` and ``config``
    artifacts (safetensors + JSON); ``predict`` returns samples as a uint8 array [N, C, H, W]."""

    model: DDGM

    def load_context(self, context: PythonModelContext) -> None:
        weights, config = Path(context.artifacts["weights"]), Path(context.artifacts["config"])
        if weights_and_config_paths(weights) != (weights, config):
            raise MlflowException(f"the model's weights {weights} and config {config} must share a folder and stem")
        device = torch.device((context.model_config or {}).get("device", "cpu"))
        self.model = load_model(weights, device).eval()

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        request = parse_request(model_input)
        try:
            levels = draw_levels(self.model, request)
        except ValueError as error:  # the samplers reject bad num_steps / eta / sampler for this model
            raise _bad(str(error)) from None
        return levels.cpu().numpy()


def model_signature(config: ModelConfig) -> ModelSignature:
    """Optional request columns in; integer levels [N, C, H, W] out."""
    inputs = Schema([ColSpec(kind, name, required=False) for name, kind in COLUMN_TYPES.items()])
    dtype = np.dtype(np.uint8 if config.num_levels <= 256 else np.int64)
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(dtype, (-1, *config.image_shape))]))


def input_example(config: ModelConfig) -> pd.DataFrame:
    """A small, quick request: 2 samples over a few levels (the article's model: all levels)."""
    request = SamplingRequest(num_samples=2)
    if config.formulation == "epsilon":
        request = replace(request, num_steps=min(EXAMPLE_STEPS, config.diffusion.num_steps))
    row = {f.name: getattr(request, f.name) for f in fields(request) if getattr(request, f.name) is not None}
    return pd.DataFrame([row])


def pip_requirements() -> list[str]:
    """The installed versions of what the model needs (local tags like +cu121 dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


@contextmanager
def tracking_at(uri: str) -> Iterator[None]:
    """MLflow's tracking URI set to ``uri`` for the block; the caller's URI (or its unset state) restored."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None: unset again
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def log_ddgm_model(run_id: str, tracking_uri: str, model_path: str | Path, register_as: str | None = None,
                   name: str = "model") -> ModelInfo:
    """Log the saved model ``model_path`` (<stem>.safetensors + <stem>.json) to run ``run_id`` at
    ``tracking_uri`` as the pyfunc ``name`` (loadable as ``runs:/<run_id>/<name>``), and register
    it as a new version of ``register_as`` when that is given."""
    weights, config_path = weights_and_config_paths(model_path)
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
    if register_as is not None and not register_as.strip():
        raise ValueError("register_as must be a non-empty model name or None")
    config = load_config(config_path)
    with tempfile.TemporaryDirectory() as tmp, tracking_at(tracking_uri):
        package = Path(tmp) / "ddgm"
        shutil.copytree(Path(ddgm.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        client = MlflowClient(tracking_uri)
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id):  # the model belongs to the run's experiment
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(CODE_FILE), artifacts={"weights": str(weights), "config": str(config_path)},
                code_paths=[str(package)], signature=model_signature(config), input_example=input_example(config),
                pip_requirements=pip_requirements(), model_config={"device": "cpu"}, registered_model_name=register_as)
        client.update_run(run_id, status=status)  # leaving the block ended the run: its owner still holds it
    return info
