"""Experiment tracking behind a small adapter, so the training loop never imports MLflow.

``MlflowTracker`` logs params, metrics (always with ``step=``), tags and artifacts to one run.
Any tracking failure (an unreachable server, a locked store) warns once and turns the
tracker off; training and its local files go on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """params value, else $MLFLOW_TRACKING_URI, else the embedded local store sqlite:///mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """The no-op tracker (non-main processes, tracking disabled); the interface of every tracker."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(Tracker):
    """One MLflow run: a new one, or an existing ``run_id`` resumed (later stages, resumed training)."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = resolve_tracking_uri(uri)
        self._client = None
        self.run_id = None
        self._guard(self._start, experiment, run_name, run_id)

    def _start(self, experiment: str, run_name: str | None, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        if run_id is None:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        self._client, self.run_id = client, run_id

    def _guard(self, call, *args: Any) -> None:
        """Run a tracking call; on failure warn once and switch tracking off."""
        if self._client is None and call != self._start:
            return
        try:
            call(*args)
        except Exception as error:  # any tracking failure must not stop training
            warnings.warn(f"MLflow tracking at {self.uri} failed ({type(error).__name__}: {error}); "
                          "continuing without tracking", RuntimeWarning, stacklevel=3)
            self._client = None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        self._guard(lambda: self._client.log_batch(self.run_id, params=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard(lambda: self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._guard(lambda: self._client.log_batch(self.run_id, metrics=items))

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None:
        for path in paths:
            self._guard(lambda p=path: self._client.log_artifact(self.run_id, str(p), folder))

    def close(self, status: str = "FINISHED") -> None:
        self._guard(lambda: self._client.set_terminated(self.run_id, status=status))


def make_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str | None = None,
                 run_id: str | None = None) -> Tracker:
    """An MlflowTracker when enabled, else the no-op Tracker."""
    return MlflowTracker(uri, experiment, run_name, run_id) if enabled else Tracker()
