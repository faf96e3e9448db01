"""What MLflow's UI shows of a training run, read back through a real tracking server's REST API
(issue 14), and a server that stops mid-run losing nothing.

- a run is findable: named after the DVC experiment, MLflow's source tags (commit, entry point),
  an experiment that opens on its training runs, a description, its dataset input and logged model;
- progress: metric histories with steps (images/s, learning rate, val bits/dim), system metrics,
  step-indexed sample grids;
- a server killed and restarted on the same port and store: every point logged meanwhile arrives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from support import free_port, kill_group, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")


class MlflowServer:
    """``python -m mlflow server`` on 127.0.0.1:``port`` over a sqlite store in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port = workdir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        log = self.workdir / "server.log"
        with open(log, "a") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 f"sqlite:///{self.workdir / 'mlflow.db'}", "--artifacts-destination", str(self.workdir / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.workdir, env=subprocess_env(unset=("MLFLOW_TRACKING_URI", "PYTHONPATH")),
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, f"mlflow server exited {self.proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"mlflow server did not answer in {timeout} s"
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGKILL the server's process group: the server blinks out without a goodbye."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


def get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


def history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return [(int(m.get("step", 0)), m["value"]) for m in points]


@pytest.fixture
def server(tmp_path):
    running = MlflowServer(tmp_path).start()
    yield running
    running.stop()


# --------------------------------------------------------------------------- outage


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_reach_it_afterwards(server, monkeypatch):
    from ddgm.training.tracking import MlflowTracker

    monkeypatch.setattr(MlflowTracker, "FLUSH_BACKOFF_S", (0.0, 0.0))  # retry at every call
    tracker = MlflowTracker(server.url, "outage", run_name="blink")
    tracker.log_metrics({"train/loss": 1.0}, 1)
    server.stop()
    with pytest.warns(RuntimeWarning, match="does not answer") as warned:  # noqa: PT031 - the whole outage
        for step in range(2, 6):  # each call tries the server again (no back-off here)
            tracker.log_metrics({"train/loss": float(step), "train/lr": step / 100}, step)
        tracker.log_params({"train": {"lr": 0.01}})
        tracker.set_tags({"during": "outage"})
    assert len([w for w in warned if "does not answer" in str(w.message)]) == 1  # once per outage, not per call
    server.start()
    tracker.log_metrics({"train/loss": 6.0}, 6)  # the first call after the restart sends what was held
    assert history(server.url, tracker.run_id, "train/loss") == [(s, float(s)) for s in range(1, 7)]
    assert history(server.url, tracker.run_id, "train/lr") == [(s, s / 100) for s in range(2, 6)]

    server.stop()  # down again: what is held at the end is sent by close(), which waits for the server
    with pytest.warns(RuntimeWarning, match="does not answer"):
        tracker.log_metrics({"train/loss": 7.0}, 7)
    restart = threading.Thread(target=server.start)
    restart.start()
    tracker.close()
    restart.join()
    run = get(server.url, "/api/2.0/mlflow/runs/get", run_id=tracker.run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"train.lr": "0.01"}
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["during"] == "outage"
    assert [s for s, _ in history(server.url, tracker.run_id, "train/loss")] == list(range(1, 8))


# --------------------------------------------------------------------------- what the UI reads


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_shards):
    """A short training run (tiny MLP, 20 steps, validation at 10 and 20) of DVC experiment
    'ui-check', logged to a real server, with a sample grid logged per validation; yields
    (server url, run id, run json)."""
    import os

    from pipeline.train import main

    workdir = tmp_path_factory.mktemp("ui")
    server = MlflowServer(workdir).start()
    values = {"data": {"out_dir": str(digits_shards)}, "diffusion": {"num_steps": 10},
              "model": {"network": "mlp", "hidden_dim": 32, "depth": 1},
              "train": {"batch_size": 16, "max_steps": 20, "warmup_steps": 2, "mixed_precision": None, "val_every": 10,
                        "val_max_images": 100, "val_batch_size": 100, "val_chunk": 10, "checkpoint_every": 10,
                        "log_every": 5, "model_dir": str(workdir / "models"),
                        "checkpoint_dir": str(workdir / "checkpoints"), "curve_file": str(workdir / "curve.tsv")},
              "tracking": {"uri": server.url, "experiment": "ui", "system_metrics": True}}
    (workdir / "p.yaml").write_text(yaml.safe_dump(values))
    saved = {k: os.environ.get(k) for k in ("DVC_EXP_NAME", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ.update(DVC_EXP_NAME="ui-check", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")
    try:
        assert main(["--params", str(workdir / "p.yaml")]) == 0
        run_id = json.loads((workdir / "models" / "run.json").read_text())["run_id"]
        yield server.url, run_id, get(server.url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        server.stop()


@pytest.mark.slow
def test_run_is_findable_by_name_source_and_description(trained_run):
    from pipeline.common import git_commit

    url, _, run = trained_run
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["run_name"] == "ui-check" and tags["dvc.exp_name"] == "ui-check"
    assert tags["mlflow.source.name"] == "pipeline/train.py" and tags["mlflow.source.type"] == "LOCAL"
    commit = git_commit()  # the tests' checkout is the one the stage ran in
    assert tags.get("mlflow.source.git.commit") == (None if commit == "unknown" else commit.removesuffix("-dirty"))
    note = tags["mlflow.note.content"]
    assert "**Params**:" in note and "mlp network" in note and "T=10" in note and "**Data**: digits" in note
    experiment = get(url, "/api/2.0/mlflow/experiments/get", experiment_id=run["info"]["experiment_id"])["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_run_shows_its_dataset_and_logged_model(trained_run):
    url, run_id, run = trained_run
    (dataset,) = run["inputs"]["dataset_inputs"]
    assert dataset["dataset"]["name"] == "digits"
    assert {t["key"]: t["value"] for t in dataset["tags"]}["mlflow.data.context"] == "training"
    outputs = run.get("outputs", {}).get("model_outputs", [])
    assert len(outputs) == 1, run.get("outputs")
    model = get(url, "/api/2.0/mlflow/logged-models/" + outputs[0]["model_id"])["model"]
    assert model["info"]["source_run_id"] == run_id


@pytest.mark.slow
def test_run_holds_metric_histories_with_steps_and_system_metrics(trained_run):
    url, run_id, run = trained_run
    for key in ("train/images_per_s", "train/lr", "train/loss"):
        points = history(url, run_id, key)
        assert [s for s, _ in points] == [5, 10, 15, 20] and all(np.isfinite(v) for _, v in points), key
    assert [s for s, _ in history(url, run_id, "val/total_bpd")] == [10, 20]
    keys = {m["key"] for m in run["data"]["metrics"]}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys


@pytest.mark.slow
def test_validation_sample_grids_are_step_indexed_images(trained_run):
    """The loop logs ``validation_grid`` as image ``samples/grid`` at each validation step."""
    url, run_id, run = trained_run
    files = get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="images").get("files", [])
    steps = sorted({int(Path(f["path"]).name.split("+step+")[1].split("+")[0])
                    for f in files if Path(f["path"]).name.startswith("samples~grid+step+")})
    assert steps == [10, 20], [f["path"] for f in files]
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}.get("mlflow.loggedImages") == "True"
