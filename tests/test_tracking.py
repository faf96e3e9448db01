"""MLflow tracking of the stages (issues 16 and 17).

- the default store is mlflow.db in the project root ($DVC_ROOT), also from DVC's temporary
  experiment workspaces, with the artifacts beside it; an explicit URI wins;
- a run is named and tagged after its DVC experiment;
- several processes writing to one new embedded store at once lose nothing;
- a resumed training run holds one value per metric per step after a kill and a resume;
- a required but unreachable store is an error, before any work;
- each stage process takes its share of the cores.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from support import free_port, repo_pythonpath, subprocess_env

from ddgm.training.config import TrackingConfig
from pipeline.params import ComputeParams

pytestmark = pytest.mark.usefixtures("single_thread")

DVC_ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS",
           "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder whose mlflow.db exists (creating a store's tables takes seconds); tests use
    their own experiment names in it."""
    root = tmp_path_factory.mktemp("project")
    _client(root / "mlflow.db").search_experiments()
    return root


# --------------------------------------------------------------------------- where runs land


def test_default_store_is_in_the_dvc_root_and_an_explicit_uri_wins(tmp_path, clean_env):
    from ddgm.training.tracking import resolve_tracking_uri

    root, workspace = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmpabc"
    workspace.mkdir(parents=True)
    clean_env.chdir(workspace)
    assert resolve_tracking_uri(None) == f"sqlite:///{workspace.resolve()}/mlflow.db"  # no DVC: the working dir
    clean_env.setenv("DVC_ROOT", str(root))
    assert resolve_tracking_uri(None) == f"sqlite:///{root.resolve()}/mlflow.db"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:////elsewhere/x.db") == "sqlite:////elsewhere/x.db"


def test_run_from_a_temporary_workspace_lands_in_the_project_named_after_the_experiment(project, clean_env):
    from pipeline.common import open_tracker

    root, workspace = project, project / ".dvc/tmp/exps/tmpabc"
    workspace.mkdir(parents=True)
    (workspace / "figure.png").write_bytes(b"png")
    clean_env.chdir(workspace)
    clean_env.setenv("DVC_ROOT", str(root))
    clean_env.setenv("DVC_EXP_NAME", "lr-0.01")
    clean_env.setenv("DVC_EXP_BASELINE_REV", "abc123")
    tracker = open_tracker(TrackingConfig(experiment="sweep"))
    tracker.log_metrics({"train/loss": 1.5}, 5)
    tracker.log_artifacts([workspace / "figure.png"], "figures")
    tracker.close()

    assert not (workspace / "mlflow.db").exists() and not (workspace / "mlruns").exists()
    run = _client(root / "mlflow.db").get_run(tracker.run_id)
    assert run.info.run_name == "lr-0.01" and run.info.status == "FINISHED"
    assert run.data.tags["dvc.exp_name"] == "lr-0.01" and run.data.tags["dvc.baseline_rev"] == "abc123"
    assert run.data.metrics == {"train/loss": 1.5}
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "figures" / "figure.png"
    assert artifact.read_bytes() == b"png" and (root / "mlruns") in artifact.parents


def test_explicit_run_name_wins_over_the_experiment_name(project, clean_env):
    from pipeline.common import open_tracker

    clean_env.chdir(project)
    clean_env.setenv("DVC_EXP_NAME", "exp-1")
    tracker = open_tracker(TrackingConfig(run_name="mine", experiment="named"))
    tracker.close()
    run = _client(project / "mlflow.db").get_run(tracker.run_id)
    assert run.info.run_name == "mine" and run.data.tags["dvc.exp_name"] == "exp-1"


def test_experiment_reusing_another_runs_model_gets_its_own_run(project, tmp_path, clean_env):
    """An experiment whose train stage did not change gets the trained model from DVC's cache, with
    the run.json of the run that trained it: its sample and evaluate stages log into a run of its own."""
    from pipeline.common import open_tracker, tracker_for_stage, write_run_file

    tracking = TrackingConfig(experiment="reuse")
    clean_env.chdir(tmp_path)
    clean_env.setenv("DVC_ROOT", str(project))
    clean_env.setenv("DVC_EXP_NAME", "baseline-exp")
    trained = open_tracker(tracking)
    trained.log_params({"train": {"lr": 0.002}})
    for step in (10, 20):
        trained.log_metrics({"val/total_bpd": 3.0 - step / 20}, step)
    write_run_file(tmp_path / "models", trained, tracking)
    trained.close()
    assert tracker_for_stage(tmp_path / "models", tracking).run_id == trained.run_id  # its own experiment

    clean_env.setenv("DVC_EXP_NAME", "sample-steps-25")
    sample_stage = tracker_for_stage(tmp_path / "models", tracking)
    sample_stage.log_metrics({"sample/seconds": 1.0}, 0)
    sample_stage.close()
    evaluate_stage = tracker_for_stage(tmp_path / "models", tracking)
    assert evaluate_stage.run_id == sample_stage.run_id != trained.run_id
    evaluate_stage.log_metrics({"eval/test/total_bpd": 2.1}, 0)
    evaluate_stage.close()

    client = _client(project / "mlflow.db")
    own = client.get_run(sample_stage.run_id)
    assert own.info.run_name == "sample-steps-25" and own.data.tags["ddgm.train_run_id"] == trained.run_id
    assert own.data.params["train.lr"] == "0.002"
    assert own.data.metrics == {"val/total_bpd": 2.0, "sample/seconds": 1.0, "eval/test/total_bpd": 2.1}
    assert [m.step for m in client.get_metric_history(own.info.run_id, "val/total_bpd")] == [20]
    assert set(client.get_run(trained.run_id).data.metrics) == {"val/total_bpd"}  # untouched


# --------------------------------------------------------------------------- concurrent writers

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ddgm.training.tracking import MlflowTracker
    db, name, start, points = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    while not start.exists():  # every writer opens the new store at the same moment
        time.sleep(0.01)
    tracker = MlflowTracker(f"sqlite:///{db}", "parallel", run_name=name, required=True)
    for step in range(points):
        tracker.log_metrics({"train/loss": float(step), "train/lr": 0.1}, step)
    tracker.close()
""")


@pytest.mark.slow
def test_parallel_writers_to_a_new_embedded_store_lose_nothing(tmp_path):
    writers, points = 3, 30
    db, start = tmp_path / "mlflow.db", tmp_path / "start"
    env = subprocess_env(venv_on_path=False, PYTHONPATH=repo_pythonpath())
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), f"w{i}", str(start), str(points)], env=env,
                              cwd=tmp_path, stderr=subprocess.PIPE, text=True) for i in range(writers)]
    try:
        start.touch()
        errors = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * writers, "\n".join(errors)
    client = _client(db)
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"w{i}" for i in range(writers)]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/lr"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(points))


# --------------------------------------------------------------------------- resumed runs


def test_resumed_tracker_skips_the_steps_the_run_holds(project):
    from ddgm.training.tracking import MlflowTracker

    uri = f"sqlite:///{project}/mlflow.db"
    first = MlflowTracker(uri, "resume")
    for step in (5, 10, 15):
        first.log_metrics({"train/loss": step / 10}, step)
    first.log_metrics({"val/total_bpd": 2.0}, 10)
    resumed = MlflowTracker(uri, "resume", run_id=first.run_id, skip_logged_steps=True)
    for step in (15, 20):  # 15 is replayed
        resumed.log_metrics({"train/loss": step / 10, "val/total_bpd": 1.0}, step)
    client = _client(project / "mlflow.db")
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")] == [
        (5, 0.5), (10, 1.0), (15, 1.5), (20, 2.0)]
    assert [m.step for m in client.get_metric_history(first.run_id, "val/total_bpd")] == [10, 15, 20]
    later = MlflowTracker(uri, "resume", run_id=first.run_id)  # a later stage logs what it is given
    later.log_metrics({"train/loss": 9.0}, 20)
    assert len(client.get_metric_history(first.run_id, "train/loss")) == 5


class Killed(BaseException):
    """Stands for SIGKILL: the process ends between two checkpoints, nothing is cleaned up."""


def test_kill_and_resume_leaves_one_point_per_step(tmp_path, project, monkeypatch, digits_shards, restore_signals):
    from ddgm.training import step as step_module
    from pipeline.train import main

    monkeypatch.chdir(tmp_path)
    values = {"data": {"out_dir": str(digits_shards)}, "diffusion": {"num_steps": 10},
              "model": {"network": "mlp", "hidden_dim": 32, "depth": 1},
              "train": {"batch_size": 16, "max_steps": 30, "warmup_steps": 2, "mixed_precision": None, "val_every": 10,
                        "val_max_images": 100, "val_batch_size": 100, "val_chunk": 10, "checkpoint_every": 10,
                        "log_every": 5},
              "tracking": {"uri": f"sqlite:///{project}/mlflow.db", "experiment": "kill"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    real, calls = step_module.compute_objective, [0]

    def dies_at_step_18(*args, **kwargs):  # after step 15 was logged, before the step-20 checkpoint
        calls[0] += 1
        if calls[0] == 18:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "compute_objective", dies_at_step_18)
    with pytest.raises(Killed):
        main(["--params", "p.yaml"])
    monkeypatch.setattr(step_module, "compute_objective", real)
    assert main(["--params", "p.yaml"]) == 0  # resumes at step 10 and replays 11..17

    client = _client(project / "mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    assert run.info.status == "FINISHED"
    for key, steps in (("train/loss", [5, 10, 15, 20, 25, 30]), ("val/total_bpd", [10, 20, 30])):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps, key


# --------------------------------------------------------------------------- required tracking


def test_required_store_that_does_not_answer_is_an_error_naming_it():
    from ddgm.training.tracking import MlflowTracker, TrackingError, check_store

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=f"MLflow tracking at {uri} failed .*tracking.required: false"):
        check_store(uri)
    with pytest.raises(TrackingError, match=uri):
        MlflowTracker(uri, "x", required=True)
    with pytest.warns(RuntimeWarning, match=uri):
        assert MlflowTracker(uri, "x").run_id is None  # not required: warn and go on


# --------------------------------------------------------------------------- threads


def test_thread_count_is_a_share_of_the_cores(tmp_path, clean_env):
    from pipeline import threads

    clean_env.setattr(threads, "usable_cores", lambda: 8)
    root = tmp_path / "project"
    root.mkdir()
    clean_env.chdir(root)
    assert threads.thread_count(ComputeParams())[0] == 8
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.thread_count(ComputeParams())[0] == 4
    clean_env.delenv("LOCAL_WORLD_SIZE")
    for name in ("tmpa", "tmpb", "standalone/tmpc"):  # two queued experiments and one --temp
        (root / ".dvc/tmp/exps" / name).mkdir(parents=True)
    clean_env.chdir(root / ".dvc/tmp/exps/tmpa")
    clean_env.setenv("DVC_ROOT", str(root))
    assert threads.thread_count(ComputeParams())[0] == 8 // 3
    clean_env.chdir(root)  # a workspace run beside them
    assert threads.thread_count(ComputeParams())[0] == 8 // 4
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.thread_count(ComputeParams()) == (3, "OMP_NUM_THREADS")
    assert threads.thread_count(ComputeParams(threads=5)) == (5, "compute.threads")
    with pytest.raises(ValueError, match=r"compute\.threads must be an integer >= 1, got 0"):
        threads.thread_count(ComputeParams(threads=0))


def test_stage_process_sets_its_threads_from_params(tmp_path, monkeypatch):
    import torch

    from pipeline.stage import run_stage

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"compute": {"threads": 1}}))
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert run_stage(lambda argv: calls.append(argv), ["--params", str(tmp_path / "p.yaml")]) == 0
    assert calls == [1, ["--params", str(tmp_path / "p.yaml")]]  # threads first, then the stage


# --------------------------------------------------------------------------- what MLflow's UI shows (issue 14)


def test_experiment_opens_on_training_runs_unless_it_has_a_kind(project):
    from ddgm.training.tracking import (
        CUSTOM_MODEL_KIND,
        EXPERIMENT_KIND_TAG,
        MlflowTracker,
    )

    uri, client = f"sqlite:///{project}/mlflow.db", _client(project / "mlflow.db")
    MlflowTracker(uri, "kind-new").close()
    assert client.get_experiment_by_name("kind-new").tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_KIND
    old = client.create_experiment("kind-old")  # made before the tag existed
    chosen = client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    MlflowTracker(uri, "kind-old").close()
    MlflowTracker(uri, "kind-chosen").close()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice stays


def test_note_sections_are_replaced_and_kept(project):
    from ddgm.training.tracking import NOTE_TAG, MlflowTracker

    uri = f"sqlite:///{project}/mlflow.db"
    tracker = MlflowTracker(uri, "note")
    tracker.note("Params", "p.yaml: epsilon")
    tracker.note("Data", "digits")
    later = MlflowTracker(uri, "note", run_id=tracker.run_id)  # the evaluate stage, run twice
    later.note("Result", "test 1.5 bits/dim")
    later.note("Result", "test 1.2 bits/dim")
    note = _client(project / "mlflow.db").get_run(tracker.run_id).data.tags[NOTE_TAG]
    assert note.split("  \n") == ["**Params**: p.yaml: epsilon", "**Data**: digits", "**Result**: test 1.2 bits/dim"]


def test_log_image_keeps_one_image_per_step(project, tmp_path):
    import numpy as np
    from PIL import Image

    from ddgm.training.tracking import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{project}/mlflow.db", "images")
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), "samples/grid", 10)
    Image.new("L", (8, 8)).save(tmp_path / "grid.png")
    tracker.log_image(tmp_path / "grid.png", "samples/grid", 20)
    client = _client(project / "mlflow.db")
    names = [Path(f.path).name for f in client.list_artifacts(tracker.run_id, "images")]
    steps = sorted({int(n.split("+step+")[1].split("+")[0]) for n in names if n.endswith(".png")})
    assert steps == [10, 20] and all(n.startswith("samples~grid+step+") for n in names)
    assert client.get_run(tracker.run_id).data.tags["mlflow.loggedImages"] == "True"


def test_points_beyond_the_buffer_drop_the_oldest_and_close_says_so(project, monkeypatch):
    """A server that does not answer: points are held (at most PENDING_LIMIT) and sent once it does."""
    from mlflow.tracking import MlflowClient

    from ddgm.training import tracking

    monkeypatch.setattr(tracking, "PENDING_LIMIT", 3)
    monkeypatch.setattr(tracking, "CLOSE_WAIT_S", 0.0)
    tracker = tracking.MlflowTracker(f"sqlite:///{project}/mlflow.db", "buffer")
    store = tracker._client
    tracker._client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server went away
    with pytest.warns(RuntimeWarning, match="does not answer.*holding the metrics"):
        tracker.log_metrics({"loss": 1.0}, 1)
    for step in range(2, 6):  # held without a try: the next one is due after the back-off
        tracker.log_metrics({"loss": float(step)}, step)
    tracker._client = store  # it is back
    with pytest.warns(RuntimeWarning, match="2 metric points were not logged"):
        tracker.close()
    history = _client(project / "mlflow.db").get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 3.0), (4, 4.0), (5, 5.0)]


def test_unreachable_means_no_answer_not_a_rejected_request():
    import requests
    from mlflow.exceptions import MlflowException

    from ddgm.training.tracking import is_unreachable

    wrapped = MlflowException("API request failed")
    wrapped.__cause__ = requests.ConnectionError("refused")
    assert is_unreachable(wrapped)
    assert is_unreachable(MlflowException("API request to /x failed with error code 503 != 200"))
    assert not is_unreachable(MlflowException("INVALID_PARAMETER_VALUE: bad key"))


def test_validation_grid_is_a_seeded_uint8_image(digits_shards):
    import numpy as np

    from ddgm.config import ModelConfig
    from ddgm.models import build_model
    from ddgm.training.progress import validation_grid
    from pipeline.params import params_from_dict

    for formulation in ("epsilon", "article"):
        values = {"diffusion": {"schedule": "cosine", "num_steps": 5},
                  "model": {"formulation": formulation, "network": "mlp", "hidden_dim": 16, "depth": 1}}
        params = params_from_dict(values)
        model = build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17)).train()
        grid = validation_grid(model, num_images=5, seed=3)
        assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
        assert grid.shape[0] < grid.shape[1] and grid.shape[1] >= 3 * 48  # 2 rows of 3 tiles, each >= 48 px
        assert np.array_equal(grid, validation_grid(model, num_images=5, seed=3)) and model.training
        assert not np.array_equal(grid, validation_grid(model, num_images=5, seed=4))
