"""What the DVC stages share: the MLflow run of this pipeline run, and the git commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ddgm.atomic import atomic_write
from ddgm.data import manifest_hash, read_manifest
from ddgm.data.lineage import dataset_input
from ddgm.training.config import TrackingConfig
from ddgm.training.tracking import (
    NOTE_TAG,
    RunRecord,
    Tracker,
    check_store,
    find_run,
    make_tracker,
    read_run,
    resolve_tracking_uri,
)
from pipeline.params import PipelineParams

RUN_FILE = "run.json"
# DVC sets these for the stages of `dvc exp run` (also --temp and queued experiments).
DVC_EXPERIMENT_ENV = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
TRAIN_RUN_TAG = "ddgm.train_run_id"  # on a run whose model another run trained
SOURCE_TYPE_LOCAL = "LOCAL"  # MLflow's SourceType of a run started from a local script


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


def source_tags(source: str | None = None) -> dict[str, str]:
    """MLflow's own source tags, which fill the UI's Source column: the entry point ``source``
    (default: the running script, relative to the working directory), its type, and the commit
    (``mlflow.source.git.dirty`` says whether tracked files had changes)."""
    if source is None:
        script = Path(sys.argv[0]).resolve()
        source = str(script.relative_to(Path.cwd())) if script.is_relative_to(Path.cwd()) else str(script)
    tags = {"mlflow.source.name": source, "mlflow.source.type": SOURCE_TYPE_LOCAL}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
        tags["mlflow.source.git.dirty"] = str(commit.endswith("-dirty")).lower()
    return tags


def system_metrics_on(tracking: TrackingConfig) -> bool:
    """tracking.system_metrics, where null means: on when CUDA is available."""
    if tracking.system_metrics is not None:
        return tracking.system_metrics
    import torch

    return torch.cuda.is_available()


def experiment_tags() -> dict[str, str]:
    """The DVC experiment this stage runs in ({'dvc.exp_name': ..., ...}; empty outside `dvc exp run`)."""
    return {tag: os.environ[name] for name, tag in DVC_EXPERIMENT_ENV.items() if os.environ.get(name)}


def open_tracker(tracking: TrackingConfig, run_id: str | None = None, resume_training: bool = False,
                 extra_tags: dict[str, str] | None = None, source: str | None = None,
                 system_metrics: bool = False) -> Tracker:
    """The configured tracker on run ``run_id``, or a new run named ``tracking.run_name``, else after
    the DVC experiment, and tagged with the git commit, MLflow's source tags (entry point
    ``source``), the experiment and ``extra_tags``.
    ``resume_training``: the training steps the run already holds are not logged again.
    ``system_metrics``: MLflow's system metrics monitor runs while the tracker is open."""
    if run_id is None:
        tags = {"git.commit": git_commit(), **source_tags(source), **experiment_tags(), **(extra_tags or {})}
        run_name = tracking.run_name or tags.get("dvc.exp_name")
        return make_tracker(tracking.enabled, tracking.uri, tracking.experiment, run_name, tags=tags,
                            required=tracking.required, system_metrics=system_metrics)
    return make_tracker(tracking.enabled, tracking.uri, tracking.experiment, run_id=run_id,
                        skip_logged_steps=resume_training, required=tracking.required, system_metrics=system_metrics)


def training_note(params: PipelineParams, params_file: str, shards: str) -> dict[str, str]:
    """The run description's lines that the train stage writes: params file and model, dataset."""
    m, d, t = params.model, params.diffusion, params.train
    dataset = dataset_input(read_manifest(shards), manifest_hash(shards), shards)
    return {"Params": f"{params_file}: {m.formulation} formulation, {m.network} network, {m.variance} variance, "
                      f"T={d.num_steps} ({d.schedule} schedule), {t.objective} objective, {t.max_steps} steps of "
                      f"batch {t.batch_size}",
            "Data": f"{dataset['name']} ({dataset['source_type']}), manifest sha256 {dataset['digest'][:12]}"}


def check_required_tracking(tracking: TrackingConfig) -> None:
    """With tracking.required, stop before any work (TrackingError) when the store does not answer."""
    if tracking.enabled and tracking.required:
        check_store(tracking.uri)


def write_run_file(model_dir: str | Path, tracker: Tracker, tracking: TrackingConfig) -> None:
    """Record the run id beside the model so the sample and evaluate stages log into the same run."""
    record = {"run_id": tracker.run_id, "tracking_uri": resolve_tracking_uri(tracking.uri),
              "experiment": tracking.experiment}
    path = Path(model_dir) / RUN_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def tracker_for_stage(model_dir: str | Path, tracking: TrackingConfig, source: str | None = None) -> Tracker:
    """The pipeline run's tracker: the run named in the model folder's run.json (a new run if it has
    none), except under `dvc exp run` when that run belongs to another DVC experiment: DVC restored
    the trained model from its cache (the train stage did not change), and this experiment gets its
    own run (``run_for_reused_model``). ``source``: the stage's entry point, for a new run's source tag."""
    path = Path(model_dir) / RUN_FILE
    run_id = json.loads(path.read_text()).get("run_id") if path.is_file() else None
    exp_name = experiment_tags().get("dvc.exp_name")
    if run_id is None or exp_name is None or not tracking.enabled:
        return open_tracker(tracking, run_id, source=source)
    trained = read_run(tracking.uri, run_id)
    if trained is None or trained.tags.get("dvc.exp_name") == exp_name:
        return open_tracker(tracking, run_id)
    return run_for_reused_model(tracking, exp_name, run_id, trained, source)


def run_for_reused_model(tracking: TrackingConfig, exp_name: str, train_run_id: str, trained: RunRecord,
                         source: str | None = None) -> Tracker:
    """Experiment ``exp_name``'s run for a model that run ``train_run_id`` trained: the one an earlier
    stage of this experiment opened (tagged ``ddgm.train_run_id``), else a new one holding the
    training run's params and the last point of each of its metrics (its full curves stay there)."""
    link = {TRAIN_RUN_TAG: train_run_id}
    own = find_run(tracking.uri, tracking.experiment, {"dvc.exp_name": exp_name, **link})
    if own is not None:
        return open_tracker(tracking, own)
    tracker = open_tracker(tracking, extra_tags=link, source=source)
    tracker.log_params(trained.params)
    if NOTE_TAG in trained.tags:
        tracker.set_tags({NOTE_TAG: trained.tags[NOTE_TAG]})
    by_step: dict[int, dict[str, float]] = {}
    for key, (step, value) in trained.last_points.items():
        by_step.setdefault(step, {})[key] = value
    for step, metrics in sorted(by_step.items()):
        tracker.log_metrics(metrics, step)
    return tracker
