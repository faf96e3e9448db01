"""Checks of the scale-out files under infra/, without a cluster, GPUs or docker.

Fast: accelerate configs load with accelerate's own loader, shell scripts pass bash -n and shellcheck
(when installed), the SLURM directives, infra/launch.sh's command lines, the Kubernetes manifests (the
shared PVC, the launcher), the Docker build context; train.sbatch picks the Python environment it is given.

Slow (real processes, CPU only): the Dockerfile's build steps and its ENTRYPOINT + CMD run in a folder
standing in for the image; two simulated nodes rendezvous through the c10d config; a time-limit signal
to train.sbatch becomes a SLURM requeue (stand-in srun/scontrol and ranks); the MLflow server script.
(Real training through accelerate configs, launch.sh and its exit 75: tests/test_scale_out.py.)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from support import free_port, kill_group, rank_reports, repo_pythonpath, subprocess_env, tool_dir, wait_for_health

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
    """What SLURM itself reads (running the script cannot show it): requeue allowed, a warning signal to the
    batch shell before the time limit, one launcher per node, all before the first command."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    directives = {ln.split()[1].split("=")[0]: ln.split()[1] for ln in lines[:first_command]
                  if ln.startswith("#SBATCH")}
    assert not [ln for ln in lines[first_command:] if ln.startswith("#SBATCH")], "SLURM ignores these"
    assert directives["--requeue"] == "--requeue" and directives["--ntasks-per-node"] == "--ntasks-per-node=1"
    assert re.fullmatch(r"--signal=B:USR1@\d+", directives["--signal"])


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
    opt = dict(itertools.pairwise(cmd))
    assert opt["--num_machines"] == "2" and opt["--num_processes"] == "8"
    assert opt["--machine_rank"] == "1"
    assert opt["--main_process_ip"] == "node-a" and opt["--main_process_port"] == "29511"
    assert opt["--rdzv_backend"] == "static" and "--same_network" in cmd
    assert cmd[-4:] == ["-m", "pipeline.train", "--params", "p.yaml"]


def test_launch_reads_pytorchjob_env():
    cmd = _dry_run({"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "2",
                    "MASTER_ADDR": "ddgm-train-master-0", "MASTER_PORT": "23456",
                    "RDZV_BACKEND": "c10d", "MIXED_PRECISION": "bf16"})
    opt = dict(itertools.pairwise(cmd))
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
    assert cmd[0] == "accelerate" and dict(itertools.pairwise(cmd))["--num_processes"] == "2"
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


# --------------------------------------------------------------------------- docker (built here without docker)

DOCKERFILE = INFRA / "docker" / "Dockerfile"

# Stand-in for pip in the simulated build (no network here): `install` builds the wheel of what it is given,
# offline, into $WHEELS/<n>; anything else (uninstall) is only logged.
PIP = """#!/bin/sh
set -f
echo "$*" >> "$PIP_LOG"
[ "$1" = install ] || exit 0
shift
targets=""
for arg in "$@"; do case "$arg" in -*) ;; *) targets="$targets $arg" ;; esac; done
n=$(ls "$WHEELS" | wc -l)
exec "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-index -q -w "$WHEELS/$n" $targets
"""


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments and blank lines dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not (line.strip() or pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerignore_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore line as a regex over context paths: * and ? within one path element, ** across them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def docker_ignored(name: str, lines: list[str]) -> bool:
    """Whether docker leaves ``name`` (a path in the build context) out: a pattern matching it or a folder above
    it excludes it, a later ``!pattern`` takes it back in."""
    parents = [name.split("/")[: i + 1] for i in range(name.count("/") + 1)]
    ignored = False
    for line in lines:
        keep = line.startswith("!")
        pattern = dockerignore_pattern(line.lstrip("!").strip("/"))
        if any(pattern.fullmatch("/".join(parts)) for parts in parents):
            ignored = not keep
    return ignored


def build_context() -> set[str]:
    """What `docker build` sends from the repository (the files git would commit) after the .dockerignore."""
    lines = [ln.strip() for ln in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return {name for name in listed if name and (ROOT / name).is_file() and not docker_ignored(name, lines)}


def test_dockerignore_matching():
    lines = ["**/__pycache__", "*.egg-info", "data", ".dvc/cache", "*.out", "!keep.out"]
    assert docker_ignored("ddgm/data/__pycache__/x.pyc", lines) and docker_ignored("__pycache__/y.pyc", lines)
    assert docker_ignored("ddgm.egg-info/PKG-INFO", lines) and not docker_ignored("sub/ddgm.egg-info/x", lines)
    assert docker_ignored("data/shards/train-000000.tar", lines) and not docker_ignored("ddgm/data/loader.py", lines)
    assert docker_ignored(".dvc/cache/files/md5/ab/cd", lines) and not docker_ignored(".dvc/config", lines)
    assert docker_ignored("job.out", lines) and not docker_ignored("keep.out", lines)


def test_docker_context_leaves_out_local_state_and_pipeline_outputs():
    """Every output dvc.yaml names (at params.yaml's paths), the virtualenv, git, DVC's cache and the MLflow
    store stay out of the image; the code, params.yaml and dvc.yaml go in."""
    lines = [ln.strip() for ln in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    outputs = []
    for spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for entry in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]:
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            outputs.append(re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(params[m[1]][m[2]]), path))
    local = [".venv/bin/python", ".git/HEAD", ".dvc/cache/files/md5/00/0", ".dvc/tmp/lock", "mlflow.db",
             "mlruns/0/meta.yaml", "ddgm/__pycache__/config.cpython-311.pyc", "ddgm.egg-info/PKG-INFO"]
    kept_in = [name for name in [*(f"{o}/file" for o in outputs), *outputs, *local] if not docker_ignored(name, lines)]
    assert not kept_in, f"sent to the image: {kept_in}"
    context = build_context()
    assert {"params.yaml", "dvc.yaml", "pyproject.toml", "infra/launch.sh", "pipeline/train.py"} <= context


@pytest.mark.slow
def test_docker_build_steps_and_entrypoint_run_without_docker(tmp_path):
    """The Dockerfile's steps from its first COPY on, run in a folder standing in for the image: COPY takes from
    the build context, RUN runs in /bin/sh with the ARG/ENV values, `pip install` building the wheel offline and
    `chown` doing nothing. The dependency layer (pyproject.toml, README.md and empty packages) builds and declares
    the extras it installs; the project layer's wheel holds every module of ddgm and pipeline; and ENTRYPOINT +
    CMD, run in WORKDIR, start pipeline.train from the image's copy, which stops in one line naming the shards
    that are not there (data/ is mounted, not built in)."""
    pytest.importorskip("setuptools", "68")
    pytest.importorskip("pip")
    context = build_context()
    image, wheels, tools = tmp_path / "image", tmp_path / "wheels", tmp_path / "tools"
    for folder in (image, wheels, tools):
        folder.mkdir()
    (tools / "pip").write_text(PIP)
    (tools / "chown").write_text("#!/bin/sh\nexit 0\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    variables = {"PIP_LOG": str(tmp_path / "pip.log"), "WHEELS": str(wheels), "PYTHON": sys.executable}
    workdir, started, entrypoint, command, user = image, False, [], [], "root"
    for word, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if word in ("ARG", "ENV"):
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                if word == "ENV" or name not in variables:  # an ARG is a default: a build-arg would win
                    variables[name] = value
        elif word == "WORKDIR":
            workdir = image / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            started = True
            *sources, destination = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                names = sorted(n for n in context if source == "." or n == source or n.startswith(source + "/"))
                assert names, f"COPY {source}: not in the build context"
                for name in names:  # a file goes into the destination, a folder's files keep their places in it
                    inner = name if source == "." else Path(name).name if name == source else Path(name).relative_to(
                        source)
                    target = workdir / destination / inner
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, target)
        elif word == "RUN" and started:
            env = _env(PATH=f"{tools}{os.pathsep}{tool_dir()}{os.pathsep}{os.environ['PATH']}", **variables)
            r = subprocess.run(["/bin/sh", "-c", args], cwd=workdir, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"RUN {args}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        elif word in ("ENTRYPOINT", "CMD"):
            (entrypoint if word == "ENTRYPOINT" else command)[:] = json.loads(args)
        elif word == "USER":
            user = args
    assert user not in ("root", "0"), "the image runs as root"

    dependencies, project = (next((wheels / str(n)).glob("*.whl")) for n in range(2))
    with zipfile.ZipFile(dependencies) as wheel:
        metadata = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    declared = set(re.findall(r"^Provides-Extra: (\S+)", metadata, re.MULTILINE))
    requested = {e for spec in re.findall(r"\.\[([\w,-]+)\]", (tmp_path / "pip.log").read_text())
                 for e in spec.split(",")}
    assert requested and requested <= declared, (requested, declared)
    with zipfile.ZipFile(project) as wheel:
        packaged = set(wheel.namelist())
    modules = {n for n in context if n.startswith(("ddgm/", "pipeline/")) and n.endswith(".py")}
    assert modules and modules <= packaged, f"not in the wheel: {sorted(modules - packaged)}"

    if Path(entrypoint[0]).name == "tini":  # the init process: it runs the rest
        entrypoint = entrypoint[entrypoint.index("--") + 1:]
    argv = [str(image / a.lstrip("/")) if a.startswith("/") else a for a in entrypoint + command]
    r = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=300,
                       env=subprocess_env(unset=("MLFLOW_TRACKING_URI", "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR",
                                                 "DDGM_WORKDIR", "PYTHONPATH", "NNODES", "NPROC_PER_NODE",
                                                 "TRAIN_MODULE", "DDGM_LAUNCH_DRY_RUN"), DDGM_TRACEBACK="1"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f'File "{workdir / "pipeline" / "train.py"}"' in r.stderr, r.stderr[-3000:]  # the image's copy ran
    assert "data/shards" in r.stderr.strip().splitlines()[-1], r.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "data").iterdir()) == []


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


@pytest.mark.slow
def test_c10d_multi_node_config_rendezvous_on_one_host(tmp_path):
    """Two launchers (= two simulated nodes, one CPU rank each) meet through multi_node_c10d.yaml. (cpu_2proc.yaml
    and multi_node_static.yaml run real training in tests/test_scale_out.py.)"""
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        logs.append(tmp_path / f"node{rank}.log")
        with open(logs[-1], "w") as fh:
            procs.append(subprocess.Popen(
                ["accelerate", "launch", "--config_file", str(ACC / "multi_node_c10d.yaml"),
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
    ranks = rank_reports(text)  # two ranks' writes to one pipe may interleave within a line
    assert ranks == [f"RANK {i} WORLD 2 TYPE MULTI_CPU BACKEND gloo SUM 3.0" for i in range(2)], text
    assert [p.returncode for p in procs] == [0, 0], text


# --------------------------------------------------------------------------- SLURM (stand-in srun and scontrol)

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

# Stand-in for a training rank (no torch: it starts at once): reports itself; with "stop" it waits for
# SIGTERM/SIGUSR1, then "checkpoints" and exits 75 as pipeline.train does; with "finish" it exits 0.
RANK = textwrap.dedent(
    """
    import os, signal, sys, time

    stop = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: stop.append(n))
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"READY {rank}/{world} shutdown {os.environ['TORCH_ELASTIC_SHUTDOWN_TIMEOUT']}", flush=True)
    if sys.argv[1] == "finish":
        sys.exit(0)
    deadline = time.time() + 90
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # checkpoint
    print(f"STOPPED {rank} {signal.Signals(stop[0]).name if stop else 'timeout'}", flush=True)
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


def _fake_python(folder: Path, works: bool, activate_note: str | None = None) -> Path:
    """``folder``/bin/python: this test's interpreter (``works``) or one that cannot import anything; with
    ``activate_note``, a bin/activate that puts it first on PATH and says so."""
    bindir = folder / "bin"
    bindir.mkdir(parents=True)
    body = f'exec {shlex.quote(sys.executable)} "$@"' if works else "exit 1"
    (bindir / "python").write_text(f"#!/bin/sh\n{body}\n")
    (bindir / "python").chmod(0o755)
    if activate_note is not None:
        (bindir / "activate").write_text(f'export PATH="{bindir}:$PATH"\necho "{activate_note}"\n')
    return bindir


def _sbatch(tmp_path: Path, path_head: list[Path], *, nodes: int, rank_args: str, **env: str | None):
    """infra/slurm/train.sbatch started as SLURM would, from a checkout in tmp_path/project (launch.sh only),
    with stand-in srun/scontrol first on PATH, then ``path_head``; the ranks run RANK with ``rank_args``."""
    project = tmp_path / "project"
    (project / "infra").mkdir(parents=True, exist_ok=True)
    shutil.copy2(LAUNCH, project / "infra" / "launch.sh")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, body in (("srun", MOCK_SRUN), ("scontrol", MOCK_SCONTROL)):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    (tmp_path / "rank.py").write_text(RANK)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    full_env = _env(
        PATH=os.pathsep.join([str(bindir), *map(str, path_head), os.environ["PATH"]]),
        MOCK_LOG=str(calls), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST="node[1-2]",
        SLURM_SUBMIT_DIR=str(project), GPUS_PER_NODE="1", SHARED_DIR=str(tmp_path / "shared"),
        MASTER_PORT=str(free_port()), TRAIN_MODULE="rank", TRAIN_ARGS=rank_args,
        PYTHONPATH=f"{tmp_path}{os.pathsep}{repo_pythonpath()}",  # rank.py; ddgm for the environment check
    )
    for name in ("VENV", "PYTHON", "MLFLOW_TRACKING_URI", "DDGM_CHECKPOINT_DIR", "NNODES", "NPROC_PER_NODE"):
        full_env.pop(name, None)
    full_env.update({k: v for k, v in env.items() if v is not None})
    log = tmp_path / "job.out"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", str(SBATCH)], cwd=project, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log, calls


ENVIRONMENTS = ["active environment over ./.venv", "VENV", "./.venv without an active one", "VENV without bin/activate",
                "no python with ddgm"]


@pytest.mark.parametrize("case", ENVIRONMENTS)
def test_sbatch_runs_in_the_environment_it_is_given(tmp_path, case):
    """The job runs in VENV when set, else in the active environment (a venv anywhere, conda, a module), else in
    the checkout's ./.venv; without a Python that imports ddgm it stops before srun, in one line. A job that
    ends with status 0 is not requeued."""
    active = tool_dir()  # `python` = this test's interpreter, which has ddgm and accelerate
    broken = _fake_python(tmp_path / "broken", works=False)
    head, env, expected = [active], {}, str(active / "python")
    if case == "active environment over ./.venv":
        _fake_python(tmp_path / "project" / ".venv", works=False, activate_note="SOURCED ./.venv")
    elif case == "VENV":
        expected = str(_fake_python(tmp_path / "named", works=True, activate_note="SOURCED VENV") / "python")
        env["VENV"] = str(tmp_path / "named")
    elif case == "./.venv without an active one":
        head = [broken]
        expected = str(_fake_python(tmp_path / "project" / ".venv", works=True, activate_note="SOURCED ./.venv")
                       / "python")
    elif case == "VENV without bin/activate":
        env["VENV"] = str(tmp_path / "no-such-venv")
    elif case == "no python with ddgm":
        head = [broken]
    proc, log, calls = _sbatch(tmp_path, head, nodes=1, rank_args="finish", **env)
    try:
        rc = proc.wait(timeout=120)
    finally:
        kill_group(proc)
    out = log.read_text()
    if case in ("VENV without bin/activate", "no python with ddgm"):
        assert rc == 2, out
        (message,) = out.strip().splitlines()
        assert ("no-such-venv has no bin/activate" if case.startswith("VENV") else "cannot import ddgm") in message
        assert calls.read_text() == "" and not (tmp_path / "shared").exists()
        return
    assert rc == 0 and f"python {expected}" in out, out
    assert ("SOURCED" in out) == (case in ("VENV", "./.venv without an active one")), out
    assert "READY 0/1" in out and "training exited with status 0" in out, out
    assert calls.read_text().splitlines() == ["srun nodes=1"], out  # no requeue


@pytest.mark.slow
def test_sbatch_preemption_requeues(tmp_path):
    """2 simulated nodes x 1 CPU rank under accelerate; SIGUSR1 (the time limit's warning) -> every rank stops
    with a checkpoint -> the job requeues itself, within the warning's lead time."""
    proc, log, calls = _sbatch(tmp_path, [tool_dir()], nodes=2, rank_args="stop")
    try:
        _wait_for(proc, log, "READY", 2, 240)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=180)
    finally:
        kill_group(proc)
    out = log.read_text()
    assert rc == 0, out
    assert sorted(re.findall(r"READY \d/2", out)) == ["READY 0/2", "READY 1/2"], out
    assert sorted(re.findall(r"STOPPED \d SIGTERM", out)) == ["STOPPED 0 SIGTERM", "STOPPED 1 SIGTERM"], out
    assert "training exited with status 75" in out, out
    assert calls.read_text().splitlines() == ["srun nodes=2", "scontrol requeue 4242"], out
    assert (tmp_path / "shared" / "checkpoints" / "ddgm").is_dir()
    # the ranks' shutdown timeout fits in the lead time SLURM gives before the time limit
    lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)", SBATCH.read_text(), re.MULTILINE).group(1))
    (shutdown,) = set(re.findall(r"READY \d/2 shutdown (\d+)", out))
    assert int(shutdown) < lead


# --------------------------------------------------------------------------- slow: MLflow


@pytest.mark.slow
def test_mlflow_serve_script(tmp_path, mlflow_store):
    """serve.sh with its defaults: the store ./mlflow-server/mlflow.db (made beforehand: making its tables takes
    seconds, and is MLflow's own) and the artifacts under ./mlflow-server/artifacts, uploaded through the server."""

    from mlflow.tracking import MlflowClient

    store = mlflow_store(tmp_path / "mlflow-server" / "mlflow.db")
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        server = subprocess.Popen(
            ["bash", str(INFRA / "mlflow" / "serve.sh")], cwd=tmp_path, stdout=fh,
            stderr=subprocess.STDOUT, env=_env(PORT=str(port), WORKERS="1"),
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server, log, 180)
        client = MlflowClient(tracking_uri=url)  # explicit: no global tracking state in the test process
        run_id = client.create_run(client.create_experiment("infra-test")).info.run_id
        client.log_param(run_id, "p", 1)
        client.log_metric(run_id, "loss", 0.5, step=1)
        note = tmp_path / "note.txt"
        note.write_text("hello")
        client.log_artifact(run_id, str(note))  # uploaded through the server (--serve-artifacts)
        client.set_terminated(run_id)
    finally:
        kill_group(server)
    stored_run = MlflowClient(tracking_uri=store).get_run(run_id)
    assert stored_run.data.params == {"p": "1"} and stored_run.info.status == "FINISHED"
    stored = list((tmp_path / "mlflow-server" / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and run_id in str(stored[0]) and stored[0].read_text() == "hello"
