"""Static and launch-level checks of the scale-out files under infra/.

Fast: accelerate configs load with accelerate's own loader, shell scripts pass bash -n
and shellcheck (when installed), Kubernetes manifests parse and mount the shared PVC,
the Dockerfile installs from pyproject, infra/launch.sh builds the right command.

Slow (real processes, CPU only, no training code): accelerate launches two gloo ranks
from infra/accelerate/cpu_2proc.yaml, two simulated nodes rendezvous through the
multi-node configs, a stop signal becomes a SLURM requeue (with stand-in srun/scontrol), the
MLflow server script. (launch.sh's exit 75 and the DVC remote round trip are tested with real
training in tests/test_scale_out.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from support import VENV_BIN, free_port, kill_group, rank_reports, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
ACC = INFRA / "accelerate"
LAUNCH = INFRA / "launch.sh"
SBATCH = INFRA / "slurm" / "train.sbatch"

SHELL_SCRIPTS = sorted(
    [*INFRA.rglob("*.sh"), *INFRA.rglob("*.sbatch")], key=lambda p: str(p)
)

# name -> (distributed_type, num_machines, num_processes, mixed_precision, rdzv_backend)
ACCELERATE_CONFIGS = {
    "single_gpu.yaml": ("NO", 1, 1, "no", None),
    "multi_gpu.yaml": ("MULTI_GPU", 1, 8, "no", "static"),
    "multi_gpu_bf16.yaml": ("MULTI_GPU", 1, 8, "bf16", "static"),
    "multi_node_static.yaml": ("MULTI_GPU", 2, 16, "no", "static"),
    "multi_node_c10d.yaml": ("MULTI_GPU", 2, 16, "no", "c10d"),
    "cpu_2proc.yaml": ("MULTI_GPU", 1, 2, "no", "static"),
}


def _env(**extra: str) -> dict[str, str]:
    """subprocess_env, but the caller's OMP_NUM_THREADS (if set) is kept and ACCELERATE_USE_CPU is unset."""
    return subprocess_env(unset=("ACCELERATE_USE_CPU",),
                          **{"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra})


# --------------------------------------------------------------------------- accelerate


def test_every_accelerate_config_is_covered():
    assert sorted(p.name for p in ACC.glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    dist, machines, procs, precision, rdzv = ACCELERATE_CONFIGS[name]
    cfg = load_config_from_file(str(ACC / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == DistributedType(dist)
    assert cfg.num_machines == machines
    assert cfg.num_processes == procs
    assert cfg.mixed_precision == precision
    if rdzv is not None:
        assert cfg.rdzv_backend == rdzv
    if machines > 1:
        assert cfg.main_process_port and cfg.main_process_ip
    if rdzv == "c10d":
        # same_network would make accelerate pass MASTER_ADDR instead of --rdzv-endpoint
        assert cfg.same_network is False


@pytest.mark.parametrize("name", ["cpu_2proc.yaml", "multi_gpu.yaml", "multi_node_static.yaml"])
def test_accelerate_launch_picks_multiprocess_launcher(name):
    """MULTI_GPU is what makes `accelerate launch` fork num_processes ranks (via torchrun)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACC / name), "train.py"])
    args, _, _ = _validate_launch_command(args)
    _, machines, procs, _, _ = ACCELERATE_CONFIGS[name]
    assert args.multi_gpu and not args.cpu
    assert args.num_processes == procs and args.num_machines == machines


# --------------------------------------------------------------------------- shell


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script):
    r = subprocess.run(
        ["shellcheck", "--shell=bash", "--severity=info", str(script)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_directives():
    text = SBATCH.read_text()
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    joined = "\n".join(directives)
    assert "--requeue" in joined
    assert "--signal=B:USR1@" in joined
    assert "--ntasks-per-node=1" in joined  # one launcher per node
    # directives must precede the first command, or SLURM ignores them
    first_cmd = next(
        i for i, ln in enumerate(text.splitlines())
        if ln.strip() and not ln.startswith("#")
    )
    assert all(text.splitlines().index(d) < first_cmd for d in directives)
    for needle in ("scontrol show hostnames", "SLURM_NODEID", "scontrol requeue",
                   "DDGM_CHECKPOINT_DIR", "MLFLOW_TRACKING_URI", "infra/launch.sh"):
        assert needle in text


def _dry_run(env: dict[str, str], *args: str) -> list[str]:
    r = subprocess.run(
        ["bash", str(LAUNCH), *args], env=_env(DDGM_LAUNCH_DRY_RUN="1", **env),
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    cmd = r.stdout.split()
    return cmd[1:] if cmd[0] == "ACCELERATE_USE_CPU=true" else cmd  # no GPU here (_env)


def test_launch_single_process_runs_python_directly():
    cmd = _dry_run({"NPROC_PER_NODE": "1", "NNODES": "1"})
    assert cmd == ["python", "-m", "pipeline.train", "--params", "params.yaml"]


def test_launch_multi_node_command():
    cmd = _dry_run(
        {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4",
         "MASTER_ADDR": "node-a", "MASTER_PORT": "29511"},
        "--params", "p.yaml",
    )
    assert cmd[:3] == ["accelerate", "launch", "--multi_gpu"]
    opt = dict(zip(cmd, cmd[1:]))
    assert opt["--num_machines"] == "2" and opt["--num_processes"] == "8"
    assert opt["--machine_rank"] == "1"
    assert opt["--main_process_ip"] == "node-a" and opt["--main_process_port"] == "29511"
    assert opt["--rdzv_backend"] == "static" and "--same_network" in cmd
    assert cmd[-4:] == ["-m", "pipeline.train", "--params", "p.yaml"]


def test_launch_reads_pytorchjob_env():
    cmd = _dry_run({"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "2",
                    "MASTER_ADDR": "ddgm-train-master-0", "MASTER_PORT": "23456",
                    "RDZV_BACKEND": "c10d", "MIXED_PRECISION": "bf16"})
    opt = dict(zip(cmd, cmd[1:]))
    assert opt["--num_machines"] == "3" and opt["--num_processes"] == "6"
    assert opt["--machine_rank"] == "2" and opt["--rdzv_backend"] == "c10d"
    assert opt["--mixed_precision"] == "bf16" and "--same_network" not in cmd


def test_launch_gpu_detection(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: X (UUID: a)'\necho 'GPU 1: X (UUID: b)'\n"
                    "echo '  MIG 1g.18gb Device 0: (UUID: c)'\n")
    fake.chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    env = _env(PATH=path, DDGM_LAUNCH_DRY_RUN="1")
    env.pop("CUDA_VISIBLE_DEVICES")

    def run(**extra):
        r = subprocess.run(["bash", str(LAUNCH)], env={**env, **extra}, cwd=ROOT,
                           capture_output=True, text=True, check=True)
        return r.stdout.split()

    cmd = run()  # auto: one rank per GPU, NCCL (no CPU override)
    assert cmd[0] == "accelerate" and dict(zip(cmd, cmd[1:]))["--num_processes"] == "2"
    cmd = run(CUDA_VISIBLE_DEVICES="1")
    assert cmd[0] == "python"
    cmd = run(CUDA_VISIBLE_DEVICES="", NPROC_PER_NODE="2")  # GPUs hidden: gloo ranks
    assert cmd[0] == "ACCELERATE_USE_CPU=true" and cmd[1] == "accelerate"


def test_launch_passes_exit_status(tmp_path):
    (tmp_path / "exitmod.py").write_text("import sys; sys.exit(int(sys.argv[1]))\n")
    for code in (0, 3):
        r = subprocess.run(
            ["bash", str(LAUNCH), str(code)], cwd=ROOT, capture_output=True, text=True,
            env=_env(NPROC_PER_NODE="1", TRAIN_MODULE="exitmod", PYTHONPATH=str(tmp_path)),
        )
        assert r.returncode == code, r.stderr


# --------------------------------------------------------------------------- kubernetes


def _k8s_docs():
    docs = {}
    for f in sorted((INFRA / "k8s").glob("*.yaml")):
        docs[f.name] = [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _pod_specs(doc):
    if doc["kind"] == "PyTorchJob":
        return {r: s["template"]["spec"] for r, s in doc["spec"]["pytorchReplicaSpecs"].items()}
    if doc["kind"] == "Job":
        return {"job": doc["spec"]["template"]["spec"]}
    return {}


def test_k8s_manifest_kinds():
    docs = _k8s_docs()
    kinds = {(d["apiVersion"], d["kind"]) for ds in docs.values() for d in ds}
    assert ("kubeflow.org/v1", "PyTorchJob") in kinds
    assert ("v1", "PersistentVolumeClaim") in kinds
    assert ("batch/v1", "Job") in kinds and ("v1", "Service") in kinds


def test_k8s_pytorchjob_and_pvc():
    docs = _k8s_docs()
    (pvc,) = docs["pvc.yaml"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claim = pvc["metadata"]["name"]

    (job,) = docs["pytorchjob.yaml"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    for spec in replicas.values():
        assert spec["restartPolicy"] == "OnFailure"
        (c,) = spec["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"  # the training operator requires this name
        assert any(p.get("name") == "pytorchjob-port" for p in c["ports"])
    assert int(job["spec"]["nprocPerNode"]) >= 1

    for name, ds in docs.items():
        for doc in ds:
            for role, pod in _pod_specs(doc).items():
                vols = {v["name"]: v for v in pod["volumes"]}
                shared = [n for n, v in vols.items()
                          if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
                assert shared, f"{name}/{role} does not use PVC {claim}"
                (c,) = pod["containers"]
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                mount = mounts[shared[0]]
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["DDGM_CHECKPOINT_DIR"].startswith(mount + "/")
                assert env["MLFLOW_TRACKING_URI"]
                grace = pod["terminationGracePeriodSeconds"]
                assert grace > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
                assert "infra/launch.sh" in " ".join(c["command"])


def test_k8s_indexed_job_consistency():
    svc, job = _k8s_docs()["job-indexed.yaml"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert pod["restartPolicy"] == "Never"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert int(env["NNODES"]["value"]) == spec["completions"]
    assert env["MASTER_ADDR"]["value"].startswith(f"{job['metadata']['name']}-0.{svc['metadata']['name']}")
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]


# --------------------------------------------------------------------------- docker


def test_dockerfile():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "COPY pyproject.toml" in text
    assert 'pip install ".[pipeline]"' in text
    assert "pip install" in text and "torch" in text
    users = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    entry = next(ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT"))
    assert "infra/launch.sh" in entry
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for p in (".git", ".venv", "data", "checkpoints", "mlflow.db"):
        assert p in ignore


# --------------------------------------------------------------------------- slow: processes

TINY = textwrap.dedent(
    """
    import torch
    from accelerate import Accelerator

    acc = Accelerator()
    t = torch.tensor([float(acc.process_index + 1)], device=acc.device)
    total = acc.reduce(t, reduction="sum").item()
    print(f"RANK {acc.process_index} WORLD {acc.num_processes} "
          f"TYPE {acc.distributed_type.value} BACKEND {acc.state.backend} SUM {total}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()  # destroy the process group before exit: gloo may abort a rank otherwise
    """
)

# Stand-in for pipeline.train's stop contract: on SIGTERM/SIGUSR1 finish, "checkpoint", exit 75.
STOPPABLE = textwrap.dedent(
    """
    import os, signal, sys, time
    from accelerate import Accelerator

    stop = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: stop.append(n))
    acc = Accelerator()
    print(f"READY {acc.process_index}/{acc.num_processes}", flush=True)
    if len(sys.argv) > 1 and sys.argv[1] == "finish":
        sys.exit(0)
    deadline = time.time() + 90
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # checkpoint
    print(f"STOPPED {acc.process_index} {signal.Signals(stop[0]).name if stop else 'timeout'}",
          flush=True)
    sys.exit(75 if stop else 1)
    """
)


def _wait_for(proc: subprocess.Popen, log: Path, needle: str, count: int, timeout: float):
    end = time.time() + timeout
    while time.time() < end:
        if log.exists() and log.read_text().count(needle) >= count:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"did not see {count}x {needle!r}:\n{log.read_text() if log.exists() else ''}")


@pytest.mark.slow
def test_cpu_2proc_config_starts_two_gloo_ranks(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    r = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ACC / "cpu_2proc.yaml"), str(script)],
        env=_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = rank_reports(r.stdout)  # both ranks share one stdout pipe: their lines may interleave
    assert lines == [
        f"RANK {i} WORLD 2 TYPE MULTI_CPU BACKEND gloo SUM 3.0" for i in range(2)
    ], r.stdout + r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multi_node_static.yaml", "multi_node_c10d.yaml"])
def test_multi_node_configs_rendezvous_on_one_host(tmp_path, name):
    """Two launchers (= two simulated nodes, one CPU rank each) meet through the config."""
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        logs.append(tmp_path / f"node{rank}.log")
        with open(logs[-1], "w") as fh:
            procs.append(subprocess.Popen(
                ["accelerate", "launch", "--config_file", str(ACC / name),
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 str(script)],
                env=_env(ACCELERATE_USE_CPU="true"), stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
    try:
        for p in procs:
            p.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            kill_group(p)
    text = "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)
    ranks = rank_reports(text)
    assert ranks == [f"RANK {i} WORLD 2 TYPE MULTI_CPU BACKEND gloo SUM 3.0" for i in range(2)], text
    assert [p.returncode for p in procs] == [0, 0], text


MOCK_SRUN = """#!/usr/bin/env bash
# stand-in for srun: run the task once per node on this host, forward SIGTERM
nodes=1
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes="${1#--nodes=}" ;; esac
  shift
done
echo "srun nodes=$nodes" >> "$MOCK_LOG"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < nodes; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p" || true; done
  r=0; wait "$p" || r=$?
  if (( r > rc )); then rc=$r; fi
done
exit "$rc"
"""

MOCK_SCONTROL = """#!/usr/bin/env bash
if [[ "$1" == show && "$2" == hostnames ]]; then printf '127.0.0.1\\n127.0.0.1\\n'; exit 0; fi
echo "scontrol $*" >> "$MOCK_LOG"
exit 0
"""


def _sbatch(tmp_path: Path, train_args: str):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in (("srun", MOCK_SRUN), ("scontrol", MOCK_SCONTROL)):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    (tmp_path / "stoppable.py").write_text(STOPPABLE)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    env = _env(
        PATH=f"{bindir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        MOCK_LOG=str(calls), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(ROOT), VENV="",
        GPUS_PER_NODE="1", SHARED_DIR=str(tmp_path / "shared"),
        MASTER_PORT=str(free_port()), TRAIN_MODULE="stoppable",
        PYTHONPATH=str(tmp_path), TRAIN_ARGS=train_args,
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DDGM_CHECKPOINT_DIR", None)
    log = tmp_path / "job.out"
    fh = open(log, "w")
    proc = subprocess.Popen(["bash", str(SBATCH)], cwd=tmp_path, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, calls, fh


@pytest.mark.parametrize("case", ["missing_venv", "python_without_ddgm"])
def test_sbatch_names_an_unusable_environment(tmp_path, case):
    """The job stops at once, before any srun, with one line naming what to fix."""
    overrides = {"VENV": str(tmp_path / "no-such-venv")}
    if case == "python_without_ddgm":
        fake = tmp_path / "fake-env"
        fake.mkdir()
        (fake / "python").write_text("#!/usr/bin/env bash\nexit 1\n")
        (fake / "python").chmod(0o755)
        overrides = {"VENV": "", "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    env = _env(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node1",
               SLURM_SUBMIT_DIR=str(ROOT), SHARED_DIR=str(tmp_path / "shared"), **overrides)
    r = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1
    assert ("no-such-venv" in message) if case == "missing_venv" else ("cannot import ddgm" in message)
    assert not (tmp_path / "shared").exists()


@pytest.mark.slow
def test_sbatch_preemption_requeues(tmp_path):
    """2 simulated nodes x 1 CPU rank; SIGUSR1 (time limit) -> ranks stop -> requeue."""
    proc, log, calls, fh = _sbatch(tmp_path, "--params params.yaml")
    try:
        _wait_for(proc, log, "READY", 2, 240)
        assert "READY 0/2" in log.read_text() and "READY 1/2" in log.read_text()
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=180)
    finally:
        kill_group(proc)
        fh.close()
    out = log.read_text()
    assert rc == 0, out
    assert "training exited with status 75" in out, out
    assert calls.read_text().splitlines() == ["srun nodes=2", "scontrol requeue 4242"], out
    assert (tmp_path / "shared" / "checkpoints" / "ddgm").is_dir()


@pytest.mark.slow
def test_sbatch_normal_completion_does_not_requeue(tmp_path):
    proc, log, calls, fh = _sbatch(tmp_path, "finish")
    try:
        rc = proc.wait(timeout=240)
    finally:
        kill_group(proc)
        fh.close()
    out = log.read_text()
    assert rc == 0, out
    assert "training exited with status 0" in out
    assert calls.read_text().splitlines() == ["srun nodes=2"], out


# --------------------------------------------------------------------------- slow: MLflow


@pytest.mark.slow
def test_mlflow_serve_script(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        server = subprocess.Popen(
            ["bash", str(INFRA / "mlflow" / "serve.sh")], cwd=tmp_path, stdout=fh,
            stderr=subprocess.STDOUT, env=_env(PORT=str(port), WORKERS="1"),
            start_new_session=True,
        )
        try:
            import urllib.request

            url = f"http://127.0.0.1:{port}"
            end = time.time() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None and time.time() < end, log.read_text()
                time.sleep(0.5)
            client = textwrap.dedent(
                """
                import mlflow, pathlib, sys
                mlflow.set_experiment("infra-test")
                with mlflow.start_run() as run:
                    mlflow.log_param("p", 1)
                    mlflow.log_metric("loss", 0.5, step=1)
                    f = pathlib.Path(sys.argv[1]); f.write_text("hello")
                    mlflow.log_artifact(str(f))
                print(run.info.run_id)
                """
            )
            r = subprocess.run(
                [sys.executable, "-c", client, str(tmp_path / "note.txt")],
                env=_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=120,
            )
            assert r.returncode == 0, r.stderr
            run_id = r.stdout.strip().splitlines()[-1]
        finally:
            kill_group(server)
    assert (tmp_path / "mlflow-server" / "mlflow.db").is_file()
    stored = list((tmp_path / "mlflow-server" / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and run_id in str(stored[0]) and stored[0].read_text() == "hello"
