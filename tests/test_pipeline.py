"""End-to-end tests of the DVC pipeline prepare -> train -> sample -> evaluate (issue 5).

Every test runs on tiny params (T=10, a one-layer MLP, 20 training steps) on the CPU:
- `dvc repro` in a throw-away git copy of this repository writes every output, the metrics
  are finite, `dvc status` is clean, a second `dvc repro` runs nothing, `dvc metrics/plots
  show` work;
- dvc.yaml: every stage depends on all the code it can import (each code dep holding some of it),
  every data path is one params.yaml key, and moving them all in params.yaml moves the whole pipeline;
- the stages of one repro log into ONE MLflow run (git commit and data manifest tags, train
  metrics, figures, eval metrics), which a user finds through `mlflow server`'s REST API;
- both presets load and run end to end, side by side in one MLflow experiment;
- the evaluate stage's quality metrics rank real images above independent-pixel samples
  above noise; missing inputs give errors that name the missing file.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from support import DVC_GIT_ENV, TINY, copy_repo, free_port, scaled, sha256_file, subprocess_env, wait_for_health

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train", "sample", "evaluate")


OUTPUTS = [
    "data/shards/manifest.json", "models/model.safetensors", "models/model.json", "plots/val_curve.tsv",
    "samples/samples.safetensors", "samples/grid.png", "figures/fig2a_real.png", "figures/fig2b_samples.png",
    "figures/fig2c_forward_noise.png", "figures/fig2d_val_curve.png", "figures/trajectory.png", "metrics.json",
    "plots/sampler_comparison.tsv",
]


# --------------------------------------------------------------------------- helpers


def _env(**extra: str | None) -> dict[str, str]:
    """The environment of the pipeline's subprocesses: the venv first on PATH, the CPU only,
    one thread each (two shared cores), no tracking/launcher settings from the caller;
    ``extra`` sets variables (None removes one)."""
    return subprocess_env(unset=("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "ACCELERATE_USE_CPU",
                                 "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR", "DDGM_WORKDIR", "PYTHONPATH"),
                          **{**DVC_GIT_ENV, **extra})


def _run(cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True, **env: str | None):
    r = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r


def git_commit_all(repo: Path, message: str) -> str:
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "--no-verify", "-m", message], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


def _mlflow_client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _artifact_files(client, run_id: str, path: str | None = None) -> dict[str, int]:
    files = {}
    for info in client.list_artifacts(run_id, path):
        files.update(_artifact_files(client, run_id, info.path) if info.is_dir else {info.path: info.file_size})
    return files


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to a process group started with start_new_session=True."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group may outlive its leader (uvicorn)
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- dvc repro


@dataclass
class Repro:
    repo: Path
    commit: str
    output: str


@pytest.fixture(scope="module")
def repro(tmp_path_factory, mlflow_store) -> Repro:
    """A copy of the repository with tiny params (committed), after one `dvc repro` (logging to the project's
    default store, mlflow.db)."""
    repo = tmp_path_factory.mktemp("repro") / "repo"
    copy_repo(repo)
    # the committed lock file and results describe the default params, not these
    for stale in ("dvc.lock", "metrics.json", "plots/val_curve.tsv", "plots/sampler_comparison.tsv"):
        (repo / stale).unlink(missing_ok=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(scaled(params, TINY), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    commit = git_commit_all(repo, "tiny params")
    mlflow_store(repo / "mlflow.db")  # ignored by git
    # as a user runs it: Python writes bytecode into the code directories the stages depend on
    r = _run(["dvc", "repro"], repo, timeout=600, PYTHONDONTWRITEBYTECODE=None)
    return Repro(repo, commit, r.stdout + r.stderr)


@pytest.mark.slow
def test_dvc_repro_writes_every_output(repro):
    from safetensors.torch import load_file

    from ddgm.serialization import load_model

    repo = repro.repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repro.output, repro.output
    missing = [name for name in OUTPUTS if not (repo / name).is_file()]
    assert not missing, f"missing outputs {missing}:\n{repro.output}"
    checkpoints = sorted(p.name for p in (repo / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000010", "step-00000020"]  # checkpoint_every=10, keep_checkpoints=2

    model = load_model(repo / "models" / "model")
    assert model.num_steps == 10 and model.config.network == "mlp"
    samples = load_file(str(repo / "samples" / "samples.safetensors"))["images"]
    assert tuple(samples.shape) == (50, *model.config.image_shape)
    assert int(samples.min()) >= 0 and int(samples.max()) < model.num_levels

    metrics = json.loads((repo / "metrics.json").read_text())
    for key in ("test/total_bpd", "val/total_bpd", "test/prior_bpd", "test/diffusion_bpd", "test/decoder_bpd",
                "test/nelbo_nats_per_image", "fd/samples_vs_test", "fd/floor_train_vs_test",
                "fd/heldout_val_vs_test", "fd/pixel_categorical_vs_test", "is/samples", "is/test",
                "classifier/test_accuracy", "nn/samples_to_train", "baseline/uniform_bpd",
                "sampler/ancestral_2_fd", "sampler/ancestral_5_fd", "sampler/ancestral_10_fd"):
        assert key in metrics, sorted(metrics)
    bad = {k: v for k, v in metrics.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    assert not bad, bad
    assert metrics["test/total_bpd"] > 0 and metrics["baseline/uniform_bpd"] == pytest.approx(math.log2(17), abs=1e-5)

    curve = (repo / "plots" / "val_curve.tsv").read_text().splitlines()
    assert curve[0].split("\t")[:2] == ["step", "val_bpd"]
    assert [float(line.split("\t")[0]) for line in curve[1:]] == [10.0, 20.0]
    table = [line.split("\t") for line in (repo / "plots" / "sampler_comparison.tsv").read_text().splitlines()]
    assert table[0] == ["sampler", "steps", "seconds", "fd_vs_test"]
    assert [(row[0], int(row[1])) for row in table[1:]] == [("ancestral", 2), ("ancestral", 5), ("ancestral", 10)]
    assert float(table[3][3]) == pytest.approx(metrics["sampler/ancestral_10_fd"], abs=1e-3)


@pytest.mark.slow
def test_dvc_status_clean_and_second_repro_runs_nothing(repro):
    repo = repro.repo
    status = _run(["dvc", "status", "--json"], repo)
    assert json.loads(status.stdout) == {}, status.stdout
    before = {name: (repo / name).stat().st_mtime_ns for name in OUTPUTS}

    # bytecode of another interpreter (or optimisation level) in the code directories is no change
    _run([sys.executable, "-m", "compileall", "-q", "-o", "2", "ddgm", "pipeline"], repo)
    assert list((repo / "ddgm" / "data" / "__pycache__").glob("*.opt-2.pyc"))
    status = _run(["dvc", "status", "--json"], repo)
    assert json.loads(status.stdout) == {}, status.stdout

    r = _run(["dvc", "repro"], repo)
    out = r.stdout + r.stderr
    assert "Running stage" not in out, out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Data and pipelines are up to date." in out, out
    assert {name: (repo / name).stat().st_mtime_ns for name in OUTPUTS} == before

    # every cached output is ignored by git; dvc.lock is staged by DVC's autostage; the uncached metrics
    # and plots are for git to track (so that experiments commit them: `dvc exp show`, `dvc plots diff`)
    porcelain = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout.splitlines()
    assert sorted(porcelain) == ["?? metrics.json", "?? plots/sampler_comparison.tsv", "?? plots/val_curve.tsv",
                                 "A  dvc.lock"], porcelain
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)


@pytest.mark.slow
def test_dvc_metrics_and_plots_show(repro, tmp_path):
    repo = repro.repo
    metrics = json.loads((repo / "metrics.json").read_text())
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo).stdout)
    (revision,) = shown.values()  # the workspace
    assert revision["data"]["metrics.json"]["data"] == metrics

    table = _run(["dvc", "metrics", "show"], repo).stdout
    assert "metrics.json" in table and "test/total_bpd" in table

    plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert {"plots/val_curve.tsv", "plots/sampler_comparison.tsv"} <= set(plots["data"])
    values = plots["data"]["plots/val_curve.tsv"][0]["content"]["data"]["values"]
    assert [float(v["step"]) for v in values] == [10.0, 20.0]

    html = tmp_path / "plots"
    _run(["dvc", "plots", "show", "-o", str(html)], repo)
    assert (html / "index.html").is_file()


CODE = ("ddgm", "pipeline")  # this repository's packages: the code dependencies of the stages
TEMPLATE = re.compile(r"\$\{([\w.]+)\}")


def module_file(name: str, root: Path = ROOT, packages: tuple[str, ...] = CODE) -> Path | None:
    """The source file of module ``name`` when it belongs to one of ``packages`` under ``root``."""
    if name.split(".")[0] not in packages:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_closure(module: str, root: Path = ROOT, packages: tuple[str, ...] = CODE) -> set[str]:
    """Every file of this repository that ``module`` can import, found statically: each import statement, also
    those inside functions (imported when called), followed transitively, with the __init__.py of each package
    on the way. Relative to ``root``, POSIX."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root, packages)
        if path is None or name in found:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                parent = package[: len(package) - node.level + 1] if node.level else []  # from . / from ..
                base = ".".join([*parent, node.module or ""]).strip(".")
                todo += [base] + [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in base
    return {path.relative_to(root).as_posix() for path in found.values()}


def trivial(path: Path) -> bool:
    """An __init__.py with nothing but a docstring: importing it changes nothing."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                               for n in body)


def _stage_paths(spec: dict, *fields: str) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for f in fields for d in spec.get(f, [])]


def test_import_closure_follows_every_kind_of_import(tmp_path):
    """Absolute, relative and from-imports, at top level and inside functions (run only when called), through
    the packages' __init__.py; other packages and modules nobody imports stay out."""
    files = {
        "app/__init__.py": "",
        "app/main.py": "import os\nfrom app import helpers\n\ndef run():\n    from app.sub import late\n",
        "app/helpers.py": "from . import util as u\nfrom .sub.deep import VALUE\n",
        "app/util.py": "import numpy\n",
        "app/sub/__init__.py": "",
        "app/sub/late.py": "from ..util import *\n",
        "app/sub/deep.py": "VALUE = 1\n",
        "app/unused.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert import_closure("app.main", tmp_path, ("app",)) == set(files) - {"app/unused.py"}
    assert import_closure("app.sub.deep", tmp_path, ("app",)) == {"app/__init__.py", "app/sub/__init__.py",
                                                                   "app/sub/deep.py"}


def test_dvc_stages_depend_on_the_code_they_run():
    """Every module of this repository that a stage can import is inside one of that stage's deps, so DVC
    reruns the stage when that code changes (an upstream stage's deps are not enough: a loader change reruns
    prepare, but its shards come out the same and train would be skipped); and every code dep holds a module
    the stage imports (no stage depends on code it never runs)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = {}
    for stage, spec in stages.items():
        words = spec["cmd"].split()
        closure = import_closure(words[words.index("-m") + 1])
        assert f"pipeline/{stage}.py" in closure
        code = [d.rstrip("/") for d in _stage_paths(spec, "deps") if d.split("/")[0] in CODE]
        missing = sorted(f for f in closure if not trivial(ROOT / f)
                         and not any(f == d or f.startswith(d + "/") for d in code))
        unused = sorted(d for d in code if not any(f == d or f.startswith(d + "/") for f in closure))
        if missing or unused:
            problems[stage] = {"missing": missing, "never imported": unused}
    assert not problems, f"dvc.yaml's code deps vs the modules each stage can import: {problems}"


def test_dvc_yaml_paths_are_params_one_key_each():
    """Every data path in dvc.yaml (outs, metrics, plots and the deps that are not code) is one params.yaml key
    written as ``${key}``, and no other key of params.yaml names the same file or folder."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = set()
    for stage, spec in stages.items():
        for path in _stage_paths(spec, "deps", "outs", "metrics", "plots"):
            if path.split("/")[0] in CODE and not TEMPLATE.search(path):
                continue
            match = TEMPLATE.fullmatch(path)
            assert match, f"{stage}: {path!r} is not a params key (write it as ${{section.key}})"
            keys.add(match.group(1))

    def value(key: str):
        section, name = key.split(".")
        assert name in params.get(section, {}), f"dvc.yaml uses ${{{key}}}, which params.yaml does not have"
        return params[section][name]

    paths = {key: Path(value(key)).as_posix() for key in keys}
    assert len(set(paths.values())) == len(paths), f"two keys for one path: {paths}"
    others = {f"{s}.{k}": Path(v).as_posix() for s, entries in params.items() if isinstance(entries, dict)
              for k, v in entries.items() if isinstance(v, str) and f"{s}.{k}" not in keys}
    doubles = {key: path for key, path in others.items() if path in paths.values()}
    assert not doubles, f"params.yaml keys naming a path that another key gives dvc.yaml: {doubles}"


def test_moving_every_path_in_params_moves_the_pipeline(tmp_path):
    """DVC's own reading of dvc.yaml with every path key of params.yaml set to a new place: every output is at
    its new place, and each stage reads the new places of the outputs upstream (a path written twice, or
    fixed in dvc.yaml, would stay behind)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keys = {m for spec in stages.values() for p in _stage_paths(spec, "deps", "outs", "metrics", "plots")
            for m in TEMPLATE.findall(p)}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    moved = {key: f"moved/{key.replace('.', '_')}" for key in keys}
    for key, path in moved.items():
        section, name = key.split(".")
        params[section][name] = path
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    probe = ("import json, sys; from dvc.repo import Repo; repo = Repo.init(sys.argv[1], no_scm=True); "
             "print(json.dumps({s.name: {'outs': sorted(o.def_path for o in s.outs), "
             "'deps': sorted(d.def_path for d in s.deps)} for s in repo.index.stages}))")
    resolved = json.loads(_run([sys.executable, "-c", probe, str(tmp_path)], tmp_path).stdout.splitlines()[-1])
    assert sorted(resolved) == sorted(stages)
    outs = {path: stage for stage, spec in resolved.items() for path in spec["outs"]}
    assert set(outs) <= set(moved.values()), f"outputs that did not move: {set(outs) - set(moved.values())}"
    for stage, spec in resolved.items():
        data = [d for d in spec["deps"] if d.split("/")[0] not in CODE and d != "params.yaml"]
        upstream = {d: outs.get(d) for d in data}
        stray = [d for d, producer in upstream.items() if producer is None and d != moved["data.path"]]
        assert not stray, f"{stage} reads {stray}, which no stage writes"
        assert all(producer != stage for producer in upstream.values())
    assert {s: sorted({outs[d] for d in spec["deps"] if d in outs}) for s, spec in resolved.items()} == {
        "prepare": [], "train": ["prepare"], "sample": ["prepare", "train"], "evaluate": ["prepare", "sample", "train"]}


# --------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_one_mlflow_run_for_all_stages(repro):
    repo = repro.repo
    client = _mlflow_client(repo / "mlflow.db")
    experiment = client.get_experiment_by_name("ddgm")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert json.loads((repo / "models" / "run.json").read_text())["run_id"] == run.info.run_id

    tags = run.data.tags
    assert tags["git.commit"] == repro.commit  # a clean checkout: no "-dirty"
    assert tags["data.manifest_sha256"] == sha256_file(repo / "data" / "shards" / "manifest.json")

    params = run.data.params
    assert params["model.formulation"] == "epsilon" and params["train.max_steps"] == "20"
    assert params["num_processes"] == "1"

    metrics = run.data.metrics
    for key in ("train/loss", "train/lr", "val/total_bpd", "best/val_bpd", "sample/seconds"):
        assert key in metrics, sorted(metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/total_bpd")] == [10, 20]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/seconds")] == [10, 20]
    validation_seconds = sum(m.value for m in client.get_metric_history(run.info.run_id, "val/seconds"))
    assert metrics["time/validation_seconds"] == pytest.approx(validation_seconds)
    assert 0 < metrics["time/validation_share"] < 1
    assert metrics["time/validation_share"] == pytest.approx(validation_seconds / metrics["time/loop_seconds"])
    evaluated = json.loads((repo / "metrics.json").read_text())
    assert {k: metrics[f"eval/{k}"] for k in evaluated} == pytest.approx(evaluated)

    files = _artifact_files(client, run.info.run_id)
    expected = {"model/model.safetensors", "model/model.json", "model/val_curve.tsv", "figures/grid.png",
                "figures/fig2a_real.png", "figures/fig2b_samples.png", "figures/fig2c_forward_noise.png",
                "figures/fig2d_val_curve.png", "figures/trajectory.png", "evaluation/metrics.json",
                "evaluation/sampler_comparison.tsv"}
    assert expected <= set(files), sorted(files)
    assert files["model/model.safetensors"] == (repo / "models" / "model.safetensors").stat().st_size

    # the best EMA weights are the run's MLflow model (the UI's Model column), and it samples
    import mlflow

    outputs = client.get_run(run.info.run_id).outputs.model_outputs
    assert len(outputs) == 1
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    samples = mlflow.pyfunc.load_model(f"models:/{outputs[0].model_id}").predict({"num_samples": 2, "num_steps": 5})
    assert samples.shape == (2, 1, 8, 8) and samples.dtype == np.uint8


def test_git_commit_tag_ignores_dvc_lock(tmp_path, monkeypatch):
    """dvc repro rewrites dvc.lock after each stage; that must not mark the next stage's run dirty."""
    from pipeline.common import git_commit

    _run(["git", "init", "-q"], tmp_path)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "sub" / "dvc.lock").write_text("schema: '2.0'\n")
    head = git_commit_all(tmp_path, "init")
    monkeypatch.chdir(tmp_path)
    assert git_commit() == head
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "sub" / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert git_commit() == head
    (tmp_path / "untracked.txt").write_text("new")
    assert git_commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit() == head + "-dirty"
    monkeypatch.chdir(tmp_path / "sub")  # from a subdirectory the whole tree counts
    assert git_commit() == head + "-dirty"


@pytest.fixture
def mlflow_server(repro, tmp_path_factory):
    """`mlflow server` on the repro's sqlite store (its artifacts are local paths it serves)."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = workdir / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", f"sqlite:///{repro.repo / 'mlflow.db'}",
             "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=workdir, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, log, 120)
        yield url
    finally:
        _stop_group(proc)


def _get(url: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{endpoint}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_server_rest_api_finds_the_run(repro, mlflow_server):
    repo, url = repro.repo, mlflow_server
    experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="ddgm")["experiment"]
    found = _post(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`git.commit` = '{repro.commit}' and params.`model.formulation` = 'epsilon'",
    })["runs"]
    assert len(found) == 1, found
    run = found[0]
    run_id = run["info"]["run_id"]
    assert json.loads((repo / "models" / "run.json").read_text())["run_id"] == run_id
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.diffusion.num_steps"] == "10" and params["train.batch_size"] == "32"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["data.manifest_sha256"] == sha256_file(repo / "data" / "shards" / "manifest.json")

    history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
    assert [m["step"] for m in history] == [5, 10, 15, 20]
    assert all(math.isfinite(m["value"]) for m in history)
    history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="val/total_bpd")["metrics"]
    curve = (repo / "plots" / "val_curve.tsv").read_text().splitlines()[1:]
    assert [(m["step"], round(m["value"], 3)) for m in history] == [
        (int(float(line.split("\t")[0])), round(float(line.split("\t")[1]), 3)) for line in curve]
    history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id,
                   metric_key="eval/test/total_bpd")["metrics"]
    assert [m["value"] for m in history] == pytest.approx(
        [json.loads((repo / "metrics.json").read_text())["test/total_bpd"]])

    listed = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="model")["files"]
    sizes = {f["path"]: f.get("file_size") for f in listed}
    local = repo / "models" / "model.safetensors"
    assert sizes.get("model/model.safetensors") == local.stat().st_size, sizes
    listed = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="figures")["files"]
    assert {"figures/fig2b_samples.png", "figures/fig2d_val_curve.png"} <= {f["path"] for f in listed}
    query = urllib.parse.urlencode({"run_id": run_id, "path": "model/model.safetensors"})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as response:
        assert hashlib.sha256(response.read()).hexdigest() == sha256_file(local)


# --------------------------------------------------------------------------- presets


PRESETS = ("article", "ho")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_its_formulation(name):
    from pipeline.params import load_params

    params = load_params(ROOT / "params.yaml", ROOT / "presets" / f"{name}.yaml")
    if name == "article":
        assert (params.model.formulation, params.model.decoder, params.sample.sampler) == (
            "article", "continuous", "ancestral")
    else:
        assert (params.model.formulation, params.train.objective, params.diffusion.schedule) == (
            "epsilon", "hybrid", "linear")


@pytest.fixture(scope="module")
def prepared(digits_shards) -> Path:
    """Shards of the default data section (digits), as the prepare stage writes them (the session's)."""
    return digits_shards


def preset_tiny(name: str, shards: Path, tracking_uri: str) -> dict:
    """The preset at tiny scale: its formulation, objective, schedule, decoder and sampler kept."""
    from pipeline.params import apply_preset

    preset = apply_preset(yaml.safe_load((ROOT / "params.yaml").read_text()),
                          yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text()))
    overrides = copy.deepcopy(TINY)
    overrides["diffusion"]["num_steps"] = min(preset["diffusion"]["num_steps"], 10)  # the article's T=5 stays
    del overrides["model"]["network"]  # the article's MLP per level, Ho's U-Net
    overrides["model"].update(base_channels=8, num_res_blocks=1)
    overrides["data"] = {"out_dir": str(shards)}
    overrides["train"].update(max_steps=10, val_every=5, checkpoint_every=5, log_every=5)
    overrides["sample"]["num_steps"] = preset["sample"]["num_steps"] and 5  # null (every level) stays null
    overrides["evaluate"]["comparison_steps"] = [2, 5] if preset["evaluate"]["comparison_steps"] else []
    overrides["tracking"] = {"uri": tracking_uri, "experiment": "presets"}
    return scaled(preset, overrides)


@pytest.fixture(scope="module")
def preset_run(prepared, tmp_path_factory, mlflow_store):
    """run(name) -> its directory, after train -> sample -> evaluate of the tiny preset there (once per module),
    each stage's main called in this process with one torch thread (the stages' own processes run in the
    `dvc repro` above); all presets log to one MLflow store, ``run.db``."""
    import importlib

    import torch

    work = tmp_path_factory.mktemp("presets")
    uri = mlflow_store(work / "mlflow.db")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            directory = work / name
            directory.mkdir()
            params = preset_tiny(name, prepared, uri)
            (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}  # train installs its own
            threads = torch.get_num_threads()
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(directory)
                for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR"):
                    patch.delenv(variable, raising=False)
                torch.set_num_threads(1)
                try:
                    for stage in ("train", "sample", "evaluate"):
                        assert not importlib.import_module(f"pipeline.{stage}").main(["--params", "params.yaml"])
                finally:
                    torch.set_num_threads(threads)
                    for sig, handler in handlers.items():
                        signal.signal(sig, handler)
            done[name] = directory
        return done[name]

    run.db = work / "mlflow.db"
    return run


@pytest.mark.slow
def test_article_preset_end_to_end(preset_run):
    from ddgm.serialization import load_model

    directory = preset_run("article")
    model = load_model(directory / "models" / "model")
    assert (model.config.formulation, model.num_steps, model.config.diffusion.schedule) == ("article", 5, "constant")
    assert (model.config.decoder, model.config.network) == ("continuous", "mlp")
    metrics = json.loads((directory / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values())
    for split in ("val", "test"):  # the exact discrete bits/dim AND the article's own continuous bound
        assert metrics[f"{split}/total_bpd"] > 0
        assert f"{split}/continuous_nelbo_nats_per_image" in metrics
    # the article's model is sampled ancestrally, over all of its T=5 levels only
    assert [k for k in metrics if k.startswith("sampler/") and k.endswith("_fd")] == ["sampler/ancestral_5_fd"]


@pytest.mark.slow
def test_ho_preset_end_to_end(preset_run):
    from ddgm.serialization import load_model

    directory = preset_run("ho")
    model = load_model(directory / "models" / "model")
    assert (model.config.formulation, model.num_steps, model.config.diffusion.schedule) == ("epsilon", 10, "linear")
    assert (model.config.variance, model.config.decoder, model.config.network) == (
        "learned_range", "discretized", "unet")
    metrics = json.loads((directory / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values())
    assert "test/continuous_nelbo_nats_per_image" not in metrics
    assert {"sampler/ancestral_2_fd", "sampler/ancestral_5_fd", "sampler/ancestral_10_fd"} <= set(metrics)


@pytest.mark.slow
def test_presets_side_by_side_in_one_experiment(preset_run):
    for name in PRESETS:
        preset_run(name)
    client = _mlflow_client(preset_run.db)
    experiment = client.get_experiment_by_name("presets")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    by_formulation = {r.data.params["model.formulation"]: r for r in runs}
    assert set(by_formulation) == {"article", "epsilon"}
    expected = {"article": ("article-T5", "full_elbo", "adamax"), "epsilon": ("ho-T1000", "hybrid", "adamw")}
    for formulation, run in by_formulation.items():
        name, objective, optimizer = expected[formulation]
        assert run.info.status == "FINISHED" and run.info.run_name == name  # the presets' run names
        assert (run.data.params["train.objective"], run.data.params["train.optimizer"]) == (objective, optimizer)
        assert "eval/test/total_bpd" in run.data.metrics and "train/loss" in run.data.metrics
        assert "model/model.safetensors" in _artifact_files(client, run.info.run_id, "model")
    assert "eval/test/continuous_nelbo_nats_per_image" in by_formulation["article"].data.metrics


# --------------------------------------------------------------------------- evaluate stage


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")  # several times faster on two shared cores
def test_quality_metrics_rank_real_above_pixel_model_above_noise(prepared):
    import torch

    from ddgm.data import load_split, read_manifest
    from ddgm.evaluation import PixelCategorical
    from pipeline.evaluate import quality_metrics

    levels = read_manifest(prepared).num_levels
    train_x, _ = load_split(prepared, "train")
    real, _ = load_split(prepared, "val")
    n, seed = len(real), 0
    candidates = {
        "real": real,
        # the same draw quality_metrics makes for its own pixel-model reference
        "pixel": PixelCategorical.fit(train_x, levels).sample(n, torch.Generator().manual_seed(seed)),
        "noise": torch.randint(0, levels, real.shape, generator=torch.Generator().manual_seed(1)).to(real.dtype),
    }
    results = {name: quality_metrics(images, str(prepared), levels, 10, seed)[0]
               for name, images in candidates.items()}
    fd = {name: m["fd/samples_vs_test"] for name, m in results.items()}
    score = {name: m["is/samples"] for name, m in results.items()}
    nn = {name: m["nn/samples_to_train"] for name, m in results.items()}
    assert fd["real"] < fd["pixel"] < fd["noise"], fd
    assert score["real"] > score["pixel"] > score["noise"], score
    assert nn["real"] < nn["pixel"] < nn["noise"], nn
    # the references are the same computations on the same images
    reference = results["real"]
    assert fd["real"] == pytest.approx(reference["fd/heldout_val_vs_test"])
    assert fd["pixel"] == pytest.approx(reference["fd/pixel_categorical_vs_test"])
    assert reference["fd/floor_train_vs_test"] < fd["pixel"]
    assert reference["classifier/test_accuracy"] > 0.5


def _tiny_params_file(directory: Path, shards: str = "data/shards") -> Path:
    params = scaled(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["data"]["out_dir"] = shards
    params["tracking"]["enabled"] = False
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("stage", ["sample", "evaluate"])
def test_stage_without_a_model_names_the_missing_file(stage, tmp_path, monkeypatch):
    import importlib

    _tiny_params_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"pipeline.{stage}").main
    with pytest.raises(FileNotFoundError, match=r"models/model\.json"):
        main(["--params", "params.yaml"])


def test_evaluate_without_samples_names_the_missing_file(tmp_path, monkeypatch):
    from ddgm.config import ModelConfig
    from ddgm.models import build_model
    from ddgm.serialization import save_model
    from pipeline.evaluate import main
    from pipeline.params import load_params

    path = _tiny_params_file(tmp_path)
    params = load_params(path)
    model = build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17))
    save_model(model, tmp_path / "models" / "model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"samples/samples\.safetensors"):
        main(["--params", "params.yaml"])
    assert not (tmp_path / "metrics.json").exists()
