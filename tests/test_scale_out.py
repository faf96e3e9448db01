"""Scale-out of the real training stage (issue 6), on CPU processes of this machine:

- the README's two-process command, `accelerate launch --config_file infra/accelerate/cpu_2proc.yaml
  -m pipeline.train`, trains and writes models/ and one MLflow run;
- two simulated nodes, each started by infra/launch.sh (with multi_node_static.yaml) in its own
  working directory, sharing only the shards, the checkpoint directory and the tracking store,
  end with identical weights on both ranks; only node 0 writes models/;
- SIGTERM to infra/launch.sh in the middle of a two-process run: both ranks write their part of one
  checkpoint and launch.sh exits 75 (accelerate itself would report 1), the MLflow run is KILLED.

(The accelerate configs' loading and launch.sh's command lines are checked in test_infra.py; that a
checkpoint written on a stop signal resumes bit for bit, also on another number of processes, in
test_training*.py; DVC's push and pull of the pipeline's outputs in test_s3_remote.py.)
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from support import DVC_GIT_ENV, free_port, scaled, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
ACC = ROOT / "infra" / "accelerate"
LAUNCH = ROOT / "infra" / "launch.sh"

pytestmark = pytest.mark.slow

# Tiny values for params.yaml (keys that exist there). 300 short steps: long enough (seconds) to be
# stopped in the middle, with a checkpoint every 10 steps and validation every 100; runs that go to the
# end take fewer.
TINY = {
    "diffusion": {"num_steps": 10},
    "model": {"network": "mlp", "hidden_dim": 32, "depth": 1},
    "train": {"max_steps": 300, "warmup_steps": 2, "batch_size": 32, "val_every": 100, "val_batch_size": 350,
              "val_chunk": 10, "checkpoint_every": 10, "log_every": 10},
}

# Stands in for pipeline.train on each rank: runs its main(), then saves this rank's own online
# and EMA weights (the library writes models/ and checkpoint weights from rank 0 only).
RANK_WEIGHTS = textwrap.dedent(
    """
    import os, sys
    from safetensors.torch import save_file
    import ddgm.training.step as step

    objectives, emas = [], []

    class RecordingObjective(step.ObjectiveModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            objectives.append(self)

    class RecordingEMA(step.EMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emas.append(self)

    step.ObjectiveModule, step.EMA = RecordingObjective, RecordingEMA
    from pipeline.train import main

    code = main(sys.argv[1:])
    rank = int(os.environ["RANK"])
    for name, module in (("model", objectives[0].model), ("ema", emas[0].ema_model)):
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, f"rank{rank}-{name}.safetensors")
    print(f"RANK {rank} OF {os.environ['WORLD_SIZE']} SAVED, exit {code}", flush=True)
    sys.exit(code)
    """
)


# --------------------------------------------------------------------------- helpers


def _env(**extra: str | None) -> dict[str, str]:
    """subprocess_env without the caller's tracking, DDGM_* and launch.sh settings, with DVC_GIT_ENV;
    ``extra`` sets variables (None removes one)."""
    return subprocess_env(unset=("MLFLOW_TRACKING_URI", "ACCELERATE_USE_CPU", "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR",
                                 "DDGM_WORKDIR", "PYTHONPATH", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR",
                                 "MASTER_PORT", "ACCELERATE_CONFIG", "TRAIN_MODULE", "MIXED_PRECISION"),
                          **{**DVC_GIT_ENV, **extra})


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str | None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r


def _start(cmd: list[str], cwd: Path, log: Path, **env: str | None) -> subprocess.Popen:
    with open(log, "a") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(**env), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """Test cleanup: SIGKILL the whole process group (the launcher and its ranks)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    return [proc.poll() for proc in procs]


def write_params(path: Path, shards: Path | str, tracking_uri: str, **train) -> Path:
    overrides = copy.deepcopy(TINY)
    overrides["data"] = {"out_dir": str(shards)}
    overrides["train"].update(**train)
    overrides["tracking"] = {"uri": tracking_uri, "experiment": "scale-out"}
    params = scaled(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _weights(path: Path, strip: str = "") -> dict:
    from safetensors.torch import load_file

    return {k.removeprefix(strip): v for k, v in load_file(str(path)).items()}


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    import torch

    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {differ[:5]} differ"


def _runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("scale-out")
    return client, (client.search_runs([experiment.experiment_id]) if experiment else [])


@pytest.fixture(scope="module")
def shards(digits_shards) -> Path:
    """The digits shards as the prepare stage writes them (the session's)."""
    return digits_shards


# --------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_process_run(shards, tmp_path_factory, mlflow_store):
    """The README's command: `accelerate launch --config_file infra/accelerate/cpu_2proc.yaml
    -m pipeline.train`, run to the end (20 steps)."""
    work = tmp_path_factory.mktemp("two-process")
    write_params(work / "params.yaml", shards, mlflow_store(work / "mlflow.db"), max_steps=20, val_every=10)
    r = _run(["accelerate", "launch", "--config_file", str(ACC / "cpu_2proc.yaml"), "-m", "pipeline.train",
              "--params", "params.yaml"], work, timeout=420, ACCELERATE_USE_CPU="true")
    return work, r.stdout + r.stderr


def test_cpu_2proc_config_trains_the_pipeline(two_process_run):
    from ddgm.serialization import load_model

    work, output = two_process_run
    assert "trained 20 steps" in output, output[-3000:]
    model = load_model(work / "models" / "model")
    assert model.num_steps == 10
    assert (work / "models" / "run.json").is_file() and (work / "plots" / "val_curve.tsv").is_file()
    final = work / "checkpoints" / "step-00000020"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "ema.safetensors"} <= {
        p.name for p in final.iterdir()}  # both ranks saved their state
    client, runs = _runs(work / "mlflow.db")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["num_processes"] == "2" and run.data.params["train.batch_size"] == "32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/total_bpd")] == [10, 20]


# --------------------------------------------------------------------------- two simulated nodes


def test_two_nodes_via_launch_sh_end_with_identical_weights(shards, tmp_path, mlflow_store):
    """Each node: infra/launch.sh with NNODES=2, its NODE_RANK, one CPU rank, its own DDGM_WORKDIR;
    shared: the params file, DDGM_SHARDS, DDGM_CHECKPOINT_DIR and the tracking store."""
    shared = tmp_path / "shared"
    params = write_params(shared / "params.yaml", "data/shards-not-on-this-node", mlflow_store(shared / "mlflow.db"),
                          max_steps=20, val_every=10)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "rank_weights.py").write_text(RANK_WEIGHTS)
    port = free_port()
    procs, logs = [], []
    try:
        for node in range(2):
            logs.append(tmp_path / f"node{node}.log")
            procs.append(_start(
                ["bash", str(LAUNCH), "--params", str(params)], ROOT, logs[-1],
                NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                ACCELERATE_CONFIG=str(ACC / "multi_node_static.yaml"), DDGM_WORKDIR=str(tmp_path / f"node{node}"),
                DDGM_SHARDS=str(shards), DDGM_CHECKPOINT_DIR=str(shared / "checkpoints"),
                TRAIN_MODULE="rank_weights", PYTHONPATH=str(lib)))
        codes = _wait(procs, 300)
    finally:
        for proc in procs:
            _kill(proc)
    text = "\n".join(f"--- {log.name}\n{log.read_text()[-5000:]}" for log in logs)
    assert codes == [0, 0], text
    assert "RANK 0 OF 2 SAVED, exit 0" in logs[0].read_text(), text
    assert "RANK 1 OF 2 SAVED, exit 0" in logs[1].read_text(), text

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    for kind in ("model", "ema"):
        assert_same_tensors(_weights(node0 / f"rank0-{kind}.safetensors"),
                            _weights(node1 / f"rank1-{kind}.safetensors"), f"{kind} weights of the two nodes")
    final = shared / "checkpoints" / "step-00000020"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final.iterdir()}
    assert_same_tensors(_weights(final / "model.safetensors", "model."), _weights(node1 / "rank1-model.safetensors"),
                        "rank 1's weights vs the checkpoint")
    # only the main process writes models/ and the curve: on node 0, in node 0's working directory
    assert (node0 / "models" / "model.safetensors").is_file() and (node0 / "plots" / "val_curve.tsv").is_file()
    assert not (node1 / "models").exists() and not (node1 / "plots").exists()
    assert not (ROOT / "data" / "shards-not-on-this-node").exists()  # DDGM_SHARDS was used
    _, runs = _runs(shared / "mlflow.db")
    assert len(runs) == 1 and runs[0].data.params["num_processes"] == "2"
    assert runs[0].data.tags["data.location"] == str(shards)


# --------------------------------------------------------------------------- preemption


def test_sigterm_to_launch_sh_checkpoints_on_both_ranks_and_exits_75(shards, tmp_path, mlflow_store):
    work = tmp_path / "run"
    write_params(work / "params.yaml", shards, mlflow_store(work / "mlflow.db"))
    log = work / "train.log"
    proc = _start(["bash", str(LAUNCH), "--params", "params.yaml"], work, log, NPROC_PER_NODE="2",
                  MASTER_PORT=str(free_port()), DDGM_WORKDIR=str(work))
    try:
        first = work / "checkpoints" / "step-00000010"
        end = time.monotonic() + 240
        while not first.exists():
            assert proc.poll() is None, f"training ended ({proc.returncode}) before {first}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < end, f"no checkpoint within 240 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        (code,) = _wait([proc], 180)
    finally:
        _kill(proc)
    text = log.read_text()
    assert code == 75, text[-5000:]
    assert text.count("stopped by signal at step ") == 2, text[-5000:]  # both ranks
    stopped = int(text.split("stopped by signal at step ")[1].split(";")[0])
    assert 10 <= stopped < 300, text[-3000:]
    last = sorted((work / "checkpoints").glob("step-*"))[-1]
    assert last.name == f"step-{stopped:08d}"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "training_state.json"} <= {
        p.name for p in last.iterdir()}  # both ranks' parts of one checkpoint
    assert not (work / "models").exists()
    _, runs = _runs(work / "mlflow.db")
    assert [r.info.status for r in runs] == ["KILLED"]
