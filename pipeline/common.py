"""What the DVC stages share: the MLflow run of this pipeline run, and the git commit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ddgm.serialization import atomic_write
from ddgm.params import TrackingParams
from ddgm.training.tracking import Tracker, make_tracker, resolve_tracking_uri

RUN_FILE = "run.json"


def git_commit() -> str:
    """The checked-out commit (with '-dirty' when tracked files have changes), or 'unknown'.

    dvc.lock does not count: ``dvc repro`` rewrites it after every stage, so a later stage of
    the same repro would otherwise always tag a clean checkout as dirty.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top,glob)**/dvc.lock"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def open_tracker(tracking: TrackingParams, run_id: str | None = None, run_name: str | None = None) -> Tracker:
    """The configured tracker on run ``run_id`` (a new run when None), tagged with the git commit."""
    tracker = make_tracker(tracking.enabled, tracking.uri, tracking.experiment, run_name or tracking.run_name, run_id)
    if run_id is None:
        tracker.set_tags({"git.commit": git_commit()})
    return tracker


def write_run_file(model_dir: str | Path, tracker: Tracker, tracking: TrackingParams) -> None:
    """Record the run id beside the model so the sample and evaluate stages log into the same run."""
    record = {"run_id": tracker.run_id, "tracking_uri": resolve_tracking_uri(tracking.uri),
              "experiment": tracking.experiment}
    path = Path(model_dir) / RUN_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def tracker_for_stage(model_dir: str | Path, tracking: TrackingParams) -> Tracker:
    """The pipeline run's tracker, read from the model folder (a new run if it has none)."""
    path = Path(model_dir) / RUN_FILE
    run_id = json.loads(path.read_text()).get("run_id") if path.is_file() else None
    return open_tracker(tracking, run_id)
