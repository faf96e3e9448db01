"""Queued DVC experiments run two at a time land in the project's default MLflow store (issue 17).

In a throw-away git copy of this repository with tiny params and no tracking settings: two
experiments queued with `dvc exp run --queue -n ... -S ...` and run with `-j 2` (DVC runs each in
a temporary copy of the workspace, which it deletes afterwards) are both found through the MLflow
API in <project>/mlflow.db: FINISHED, named and tagged after their experiments, with their
training, sampling and evaluation metrics and their model artifact.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from support import DVC_GIT_ENV, TINY, copy_repo, scaled, subprocess_env

EXPERIMENTS = {"sweep-lr-1": "0.001", "sweep-lr-4": "0.004"}


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run ``cmd`` with its output in a file: the queue workers that `dvc exp run --run-all` starts
    outlive it and would hold a pipe open. No tracking settings from the caller, and no
    OMP_NUM_THREADS: the stages choose their own thread counts."""
    env = subprocess_env(unset=("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "DDGM_SHARDS",
                                "DDGM_CHECKPOINT_DIR", "PYTHONPATH"), OMP_NUM_THREADS=None, **DVC_GIT_ENV)
    with tempfile.TemporaryFile("w+") as log:
        r = subprocess.run(cmd, check=False, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
        log.seek(0)
        output = log.read()
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mlflow_store) -> Path:
    """A repository copy with tiny params, its data prepared and committed (as before a sweep of training
    params), whose two queued experiments ran with -j 2."""
    repo = tmp_path_factory.mktemp("sweep") / "repo"
    copy_repo(repo)
    (repo / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(scaled(params, TINY), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "--no-verify", "-m", "tiny params"], repo)
    _run(["dvc", "repro", "prepare"], repo)  # the experiments take the shards from the cache
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "--no-verify", "-m", "prepared"], repo)
    mlflow_store(repo / "mlflow.db")  # the project's default store (ignored by git)
    try:
        for name, lr in EXPERIMENTS.items():
            _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], repo)
        _run(["dvc", "exp", "run", "--run-all", "-j", "2"], repo, timeout=1200)
        status = _run(["dvc", "queue", "status"], repo)
        failed = {name: _run(["dvc", "queue", "logs", name], repo)[-3000:] for name in EXPERIMENTS
                  if any(line.split()[1:3] == [name, "Failed"] for line in status.splitlines() if line.split())}
        assert not failed, f"{status}\n{failed}"
    finally:
        _run(["dvc", "queue", "stop"], repo, timeout=120)  # the idle workers exit
    return repo


@pytest.mark.slow
def test_queued_parallel_experiments_land_in_the_default_store(swept):
    from mlflow.tracking import MlflowClient

    repo = swept
    assert not list((repo / ".dvc/tmp/exps").glob("tmp*")), "DVC's temporary workspaces are gone"
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddgm")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(EXPERIMENTS)
    for run in runs:
        name = run.info.run_name
        assert run.info.status == "FINISHED", name
        assert run.data.tags["dvc.exp_name"] == name
        assert run.data.params["train.lr"] == EXPERIMENTS[name]
        metrics = run.data.metrics
        for key in ("train/loss", "val/total_bpd", "best/val_bpd", "sample/seconds", "eval/test/total_bpd",
                    "eval/fd/samples_vs_test"):
            assert key in metrics and math.isfinite(metrics[key]), (name, sorted(metrics))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20]
        artifact = Path(run.info.artifact_uri.removeprefix("file://")) / "model" / "model.safetensors"
        assert artifact.is_file() and (repo / "mlruns") in artifact.parents


@pytest.mark.slow
def test_dvc_exp_show_and_plots_diff_have_both_experiments_with_the_same_metrics(swept):
    from mlflow.tracking import MlflowClient

    shown = json.loads(_run(["dvc", "exp", "show", "--json"], swept))
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for revision in exp["revs"]:
                metrics = (revision.get("data") or {}).get("metrics", {}).get("metrics.json", {}).get("data")
                if revision.get("name") in EXPERIMENTS and metrics:
                    found[revision["name"]] = metrics
    assert sorted(found) == sorted(EXPERIMENTS), shown
    plots = json.loads(_run(["dvc", "plots", "diff", *EXPERIMENTS, "--json"], swept))
    assert not plots.get("errors"), plots.get("errors")
    for name in ("plots/val_curve.tsv", "plots/sampler_comparison.tsv"):
        assert {rev for plot in plots["data"][name] for rev in plot["revisions"]} == set(EXPERIMENTS), name
    client = MlflowClient(tracking_uri=f"sqlite:///{swept / 'mlflow.db'}")
    for run in client.search_runs([client.get_experiment_by_name("ddgm").experiment_id]):
        expected = found[run.info.run_name]
        assert {k: run.data.metrics[f"eval/{k}"] for k in expected} == pytest.approx(expected)
