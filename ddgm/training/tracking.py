"""Experiment tracking behind a small adapter, so the training loop never imports MLflow.

``MlflowTracker`` logs params, metrics (always with ``step=``), tags and artifacts to one run.

- The default store is the embedded ``sqlite:///<project root>/mlflow.db``, where the project
  root is ``$DVC_ROOT`` (DVC sets it for every stage, to the user's repository also inside the
  temporary workspaces of ``dvc exp run --temp`` and queued experiments), else the working
  directory. Artifacts of an experiment created in an embedded store go to ``mlruns/`` beside it.
- Several processes may write to one embedded store at once: opening a store (its tables,
  experiment and run) is serialised by a lock file beside it, and a write that finds the
  database locked is retried with back-off, so nothing is dropped.
- A resumed run can skip the steps it already holds (``skip_logged_steps``): a resumed job
  replays the steps after its last checkpoint, and MLflow then keeps one value per step.
- A tracking server that does not answer (connection refused or timed out, HTTP 5xx/429) loses
  nothing: metric points, params and tags are held in a bounded buffer (``PENDING_LIMIT`` metric
  points; when it is full the oldest points are dropped, and ``close`` says how many) and sent,
  in order, on a later call (retries back off from 2 s to 60 s) and at ``close``, which waits up to
  ``CLOSE_WAIT_S`` for the server when the run finished (a killed or failed run tries once). An
  artifact, image, dataset or model logged during the outage is skipped with a warning. With
  tracking ``required`` every failure raises ``TrackingError``.
- Any other tracking failure warns once and turns the tracker off (training goes on), unless
  tracking is ``required``.
- The experiment is tagged as one of custom model training (``mlflow.experimentKind``), so MLflow 3's
  UI opens it on its training runs; ``note`` writes the run's description (``mlflow.note.content``);
  ``log_image`` logs step-indexed images (the UI's image grid with a step slider); with
  ``system_metrics`` MLflow's monitor logs CPU, memory, disk, network (and GPU with ``pynvml``)
  use as ``system/*`` metrics while the tracker is open.
"""

from __future__ import annotations

import functools
import os
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLflow is imported where it is used: the no-op tracker needs none of it
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

DEFAULT_STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlruns"
WRITE_ATTEMPTS = 10  # back-off 0.1 s, 0.2 s, ... capped at 5 s: about half a minute of a locked database
LOCK_TIMEOUT_S = 120.0
PENDING_LIMIT = 100_000  # metric points held while the server is unreachable (the oldest go first)
CLOSE_WAIT_S = 30.0  # how long close() keeps retrying held points before it gives them up
BATCH_METRICS, BATCH_PARAMS_OR_TAGS = 1000, 100  # MLflow's log_batch limits
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow 3's UI: which view an experiment opens on
CUSTOM_MODEL_KIND = "custom_model_development"  # its value for model training (the UI's ExperimentKind enum)
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI (Markdown)


class TrackingError(RuntimeError):
    """Tracking is required (tracking.required) but the tracking store cannot be used."""


def project_root() -> Path:
    """The DVC project root: $DVC_ROOT when a DVC stage runs, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def default_tracking_uri() -> str:
    """The embedded store mlflow.db in the project root, as an absolute sqlite URI."""
    return f"sqlite:///{project_root() / DEFAULT_STORE_FILE}"


def resolve_tracking_uri(uri: str | None) -> str:
    """params value, else $MLFLOW_TRACKING_URI, else the embedded store in the project root."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute: ``sqlite:////abs``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").split("?")[0]
    return Path(name).resolve() if name and name != ":memory:" else None


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


def is_transient(error: Exception) -> bool:
    """A concurrent writer holds the embedded database (SQLite 'database is locked' / busy)."""
    text = str(error).lower()
    return "database is locked" in text or "database table is locked" in text or "sqlite_busy" in text


def is_unreachable(error: BaseException) -> bool:
    """The tracking server did not answer: a refused or timed-out connection anywhere in the error's
    chain, or an HTTP 5xx / 429 status (a server that is starting or overloaded)."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return re.search(r"error code (5\d\d|429)\b", str(error)) is not None


def with_retries(call: Callable[[], Any], attempts: int = WRITE_ATTEMPTS) -> Any:
    """``call()``, retried with exponential back-off while the database is locked by another writer.
    (A failed MLflow store call rolls its transaction back, so a retry writes nothing twice.)"""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:
            if attempt == attempts - 1 or not is_transient(error):
                raise
            time.sleep(min(5.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")


def describe(error: Exception) -> str:
    """'Type: message' on one line, at most 400 characters."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


def failure_message(uri: str, error: Exception) -> str:
    """What a required tracking store's failure tells the user."""
    return (f"MLflow tracking at {uri} failed ({describe(error)}); start the tracking server or fix tracking.uri / "
            "MLFLOW_TRACKING_URI, or set tracking.required: false to go on without it")


class Tracker:
    """The no-op tracker (non-main processes, tracking disabled); the interface of every tracker."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None: ...

    def log_image(self, image: Any, key: str, step: int) -> None:
        """Log ``image`` (a path, an [H, W(, C)] uint8 array or a PIL image) as the ``key`` image of ``step``."""

    def note(self, section: str, text: str) -> None:
        """Set the ``section`` line of the run's description, keeping its other lines."""

    def close(self, status: str = "FINISHED") -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, source_type: str, profile: dict[str, Any],
                    context: str = "training") -> None:
        """Record the run's input dataset: ``digest`` identifies its version, ``source`` where it came from."""

    def log_model(self, model_path: str | Path, register_as: str | None = None) -> None:
        """Log the saved model ``model_path`` (<stem>.safetensors + .json) as the run's MLflow model,
        registered as a new version of ``register_as`` when given."""


class MlflowTracker(Tracker):
    """One MLflow run: a new one, or an existing ``run_id`` resumed (later stages, resumed training).

    ``skip_logged_steps``: on a resumed run, metric points at steps <= the last step the run
    already holds for that metric are not logged again (a resumed job replays those steps with
    the same values). ``required``: a tracking failure raises TrackingError instead of warning.
    ``system_metrics``: run MLflow's system metrics monitor on the run until ``close``.
    """

    FLUSH_BACKOFF_S = (2.0, 60.0)  # first and longest wait between two tries of an unreachable server

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 tags: dict[str, str] | None = None, skip_logged_steps: bool = False, required: bool = False,
                 system_metrics: bool = False):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = resolve_tracking_uri(uri)
        self.required = required
        self._client: MlflowClient | None = None  # None: tracking is off (not started, or failed)
        self._last_step: dict[str, int] = {}
        self._pending_metrics: deque = deque()
        self._pending_params: dict[str, str] = {}
        self._pending_tags: dict[str, str] = {}
        self._dropped = 0
        self._retry_at, self._backoff, self._outage = 0.0, self.FLUSH_BACKOFF_S[0], False
        self._monitor: SystemMetricsMonitor | None = None
        self.run_id: str | None = None
        self._attempt(lambda: self._start(experiment, run_name, run_id, tags or {}, skip_logged_steps),
                      "the run", starting=True)
        if system_metrics and self._client is not None:
            try:
                self._start_monitor(resumed=run_id is not None)
            except Exception as error:  # the monitor is an extra: training and tracking go on without it
                warnings.warn(f"MLflow system metrics are not logged ({describe(error)})", RuntimeWarning, stacklevel=2)

    def _start(self, experiment: str, run_name: str | None, run_id: str | None, tags: dict[str, str],
               skip_logged_steps: bool) -> None:
        from mlflow.tracking import MlflowClient

        database = sqlite_path(self.uri)
        with _store_lock(database):  # one process at a time creates tables, experiments and runs
            client = MlflowClient(tracking_uri=self.uri)
            if run_id is None:
                experiment_id = _training_experiment(client, experiment, database)
                run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            else:
                client.update_run(run_id, status="RUNNING")
                if skip_logged_steps:
                    self._last_step = last_logged_steps(client, run_id)
        self._client, self.run_id = client, run_id

    def _start_monitor(self, resumed: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self._run, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()

    @property
    def _store(self) -> MlflowClient:
        """The client of the run; the calls that use it run only while tracking is on."""
        assert self._client is not None, "tracking is off"
        return self._client

    @property
    def _run(self) -> str:
        """The run's id (set with the client)."""
        assert self.run_id is not None, "no run"
        return self.run_id

    def _attempt(self, call: Callable[[], Any], what: str, starting: bool = False) -> None:
        """Run a tracking call that is not held back when it fails (retried while the database is locked)."""
        if self._client is None and not starting:
            return
        try:
            with_retries(call)
        except Exception as error:  # any tracking failure must not stop training unless required
            self._failed(error, what, skippable=not starting)

    def _failed(self, error: Exception, what: str, skippable: bool) -> None:
        """Required: raise TrackingError. Unreachable server (``skippable``): warn that ``what`` was not
        logged. Else warn once and switch tracking off."""
        if self.required:
            raise TrackingError(failure_message(self.uri, error)) from None
        if skippable and is_unreachable(error):
            warnings.warn(f"MLflow tracking at {self.uri} does not answer ({describe(error)}); {what} not logged",
                          RuntimeWarning, stacklevel=4)
            return
        self._client = None
        warnings.warn(f"MLflow tracking at {self.uri} failed ({describe(error)}); continuing without tracking",
                      RuntimeWarning, stacklevel=4)

    def _hold(self, metrics: Iterable = (), params: dict[str, str] | None = None,
              tags: dict[str, str] | None = None) -> None:
        """Queue points, params and tags, then send the queue unless the server is waited for."""
        if self._client is None:
            return
        for metric in metrics:
            if len(self._pending_metrics) == PENDING_LIMIT:
                self._pending_metrics.popleft()
                self._dropped += 1
            self._pending_metrics.append(metric)
        self._pending_params.update(params or {})
        self._pending_tags.update(tags or {})
        if time.monotonic() >= self._retry_at:
            self._flush()

    def _flush(self) -> bool:
        """Send everything held, in order; True when nothing is left. An unreachable server keeps
        the rest for the next try, after a back-off."""
        try:
            with_retries(self._send_pending)
        except Exception as error:
            if self.required or not is_unreachable(error):
                self._failed(error, "", skippable=False)
                return False
            if not self._outage:
                warnings.warn(f"MLflow tracking at {self.uri} does not answer ({describe(error)}); holding the "
                              "metrics until it does", RuntimeWarning, stacklevel=4)
            self._outage, self._retry_at = True, time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, self.FLUSH_BACKOFF_S[1])
            return False
        self._outage, self._retry_at, self._backoff = False, 0.0, self.FLUSH_BACKOFF_S[0]
        return True

    def _send_pending(self) -> None:
        """log_batch calls within MLflow's limits; each drops what it sent from the queue."""
        from mlflow.entities import Param, RunTag

        while self._pending_params:
            keys = list(self._pending_params)[:BATCH_PARAMS_OR_TAGS]
            self._store.log_batch(self._run, params=[Param(k, self._pending_params[k]) for k in keys])
            for key in keys:
                del self._pending_params[key]
        while self._pending_tags:
            keys = list(self._pending_tags)[:BATCH_PARAMS_OR_TAGS]
            self._store.log_batch(self._run, tags=[RunTag(k, self._pending_tags[k]) for k in keys])
            for key in keys:
                del self._pending_tags[key]
        while self._pending_metrics:
            batch = [self._pending_metrics[i] for i in range(min(BATCH_METRICS, len(self._pending_metrics)))]
            self._store.log_batch(self._run, metrics=batch)
            for _ in batch:
                self._pending_metrics.popleft()

    def log_params(self, params: dict[str, Any]) -> None:
        self._hold(params={k: str(v)[:6000] for k, v in flatten(params).items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._hold(tags={k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if int(step) > self._last_step.get(k, -1)]
        if items:
            self._hold(metrics=items)

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None:
        for path in paths:
            self._attempt(functools.partial(self._log_artifact, path, folder), f"artifact {path}")

    def _log_artifact(self, path: str | Path, folder: str | None) -> None:
        self._store.log_artifact(self._run, str(path), folder)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A step-indexed image (``images/<key>+step+<step>+...`` artifacts and the run's
        ``mlflow.loggedImages`` tag): the UI's image grid shows it with a step slider."""
        if isinstance(image, (str, Path)):
            from PIL import Image

            with Image.open(image) as opened:
                image = opened.copy()
        self._attempt(lambda: self._store.log_image(self._run, image, key=key, step=int(step), synchronous=True),
                      f"image {key} of step {step}")

    def note(self, section: str, text: str) -> None:
        """The description is one Markdown line per section, ``**<section>**: <text>``."""

        def update() -> None:
            current = self._store.get_run(self._run).data.tags.get(NOTE_TAG, "")
            self._store.set_tag(self._run, NOTE_TAG, with_note_line(current, section, text))

        self._attempt(update, "the run description")

    def close(self, status: str = "FINISHED") -> None:
        """Stop the system metrics monitor, send what is held (a FINISHED run waits up to
        CLOSE_WAIT_S for an unreachable server; a killed or failed one tries once), end the run."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        deadline = time.monotonic() + (CLOSE_WAIT_S if status == "FINISHED" else 0.0)
        while self._client is not None and not self._flush() and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        lost = self._dropped + len(self._pending_metrics)
        if lost and self._client is not None:
            warnings.warn(f"MLflow tracking at {self.uri}: {lost} metric points were not logged (the server did "
                          f"not answer at the end of the run, or more than {PENDING_LIMIT} were held)",
                          RuntimeWarning, stacklevel=2)
        self._attempt(lambda: self._store.set_terminated(self._run, status=status), "the run's end")

    def log_dataset(self, name: str, digest: str, source: str, source_type: str, profile: dict[str, Any],
                    context: str = "training") -> None:
        """An MLflow dataset input of the run (what ``mlflow.log_input`` logs), shown in the run's Datasets
        column; the digest is cut to MLflow's 36 characters, the profile stored as JSON."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type=source_type,
                          source=json.dumps({"uri": source}), profile=json.dumps(profile, sort_keys=True))
        item = DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context)])
        self._attempt(lambda: self._store.log_inputs(self._run, datasets=[item]), f"dataset {name}")

    def log_model(self, model_path: str | Path, register_as: str | None = None) -> None:
        """The models-from-code pyfunc of ddgm.training.mlflow_model (no pickle), loadable as
        ``runs:/<run_id>/sampler`` (the run's ``model/`` artifacts hold the plain safetensors files)."""
        from ddgm.training.mlflow_model import log_ddgm_model

        self._attempt(lambda: log_ddgm_model(self._run, self.uri, model_path, register_as, name="sampler"),
                      f"model {model_path}")


def _training_experiment(client: MlflowClient, name: str, database: Path | None) -> str:
    """The id of experiment ``name`` (created when missing, its artifacts beside an embedded store),
    tagged as custom model training unless it already has a kind."""
    found = client.get_experiment_by_name(name)
    if found is None:
        location = (database.parent / ARTIFACTS_DIR).as_uri() if database else None
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: CUSTOM_MODEL_KIND})
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, CUSTOM_MODEL_KIND)
    return found.experiment_id


def with_note_line(note: str, section: str, text: str) -> str:
    """``note`` with its ``**<section>**:`` line replaced by (or, when missing, followed by) the new one."""
    line = f"**{section}**: {' '.join(text.split())}"
    lines = [old.rstrip() for old in note.splitlines() if old.strip()]
    index = next((i for i, old in enumerate(lines) if old.startswith(f"**{section}**:")), None)
    if index is None:
        lines.append(line)
    else:
        lines[index] = line
    return "  \n".join(lines)


def last_logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """{metric: the highest step run ``run_id`` holds for it}."""
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


@dataclass
class RunRecord:
    """What a finished run holds: its tags, params and the last point of each metric."""

    tags: dict[str, str]
    params: dict[str, str]
    last_points: dict[str, tuple[int, float]]  # metric -> (step, value)


def read_run(uri: str | None, run_id: str) -> RunRecord | None:
    """Run ``run_id`` of the store, or None when it cannot be read (the tracker reports failures)."""
    try:
        from mlflow.tracking import MlflowClient

        resolved = resolve_tracking_uri(uri)
        with _store_lock(sqlite_path(resolved)):
            client = MlflowClient(tracking_uri=resolved)
            run = with_retries(lambda: client.get_run(run_id))
            steps = with_retries(lambda: last_logged_steps(client, run_id))
    except Exception:
        return None
    return RunRecord(dict(run.data.tags), dict(run.data.params),
                     {key: (steps[key], value) for key, value in run.data.metrics.items()})


def find_run(uri: str | None, experiment: str, tags: dict[str, str]) -> str | None:
    """The newest run of ``experiment`` that carries all of ``tags``, or None (also when the store fails)."""
    try:
        from mlflow.tracking import MlflowClient

        resolved = resolve_tracking_uri(uri)
        with _store_lock(sqlite_path(resolved)):
            client = MlflowClient(tracking_uri=resolved)
            found = with_retries(lambda: client.get_experiment_by_name(experiment))
            runs = with_retries(lambda: client.search_runs([found.experiment_id],
                                                           order_by=["attributes.start_time DESC"]))
    except Exception:
        return None
    return next((r.info.run_id for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())), None)


def _store_lock(database: Path | None) -> AbstractContextManager[object]:
    """An inter-process lock beside an embedded database (nothing for a server or other store)."""
    if database is None:
        return nullcontext()
    from filelock import FileLock

    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(database) + ".lock", timeout=LOCK_TIMEOUT_S)


def check_store(uri: str | None) -> None:
    """Raise TrackingError unless the tracking store answers (used when tracking is required,
    so that an unreachable server stops a stage before any work)."""
    resolved = resolve_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient

        with _store_lock(sqlite_path(resolved)):
            with_retries(lambda: MlflowClient(tracking_uri=resolved).search_experiments(max_results=1))
    except Exception as error:
        raise TrackingError(failure_message(resolved, error)) from None


def make_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str | None = None,
                 run_id: str | None = None, tags: dict[str, str] | None = None, skip_logged_steps: bool = False,
                 required: bool = False, system_metrics: bool = False) -> Tracker:
    """An MlflowTracker when enabled, else the no-op Tracker."""
    if not enabled:
        return Tracker()
    return MlflowTracker(uri, experiment, run_name, run_id, tags, skip_logged_steps, required, system_metrics)
