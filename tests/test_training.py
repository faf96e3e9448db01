"""The train stage on one CPU process: outputs, checkpoints and resumption (bit for bit, also
after SIGKILL), preemption (SIGTERM -> checkpoint -> exit 75), non-finite losses, config
validation before any work, and MLflow tracking.

Tiny models (an MLP of width 32, T=10) on the digits shards prepared once per session.
Several processes (Accelerate, gloo) are in test_training_distributed.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import free_port, kill_group, repo_pythonpath, subprocess_env

from ddgm.config import ModelConfig
from ddgm.data import manifest_hash
from ddgm.objectives import ObjectiveOutput
from ddgm.serialization import load_model
from ddgm.training import fingerprint, validator
from ddgm.training import step as step_module
from ddgm.training.curve import CURVE_COLUMNS, read_curve
from ddgm.training.loop import train
from ddgm.training.signals import Preempted, StopSignal
from ddgm.training.step import NonFiniteLoss
from ddgm.training.tracking import Tracker
from ddgm.training.validation import SplitELBO, split_elbo
from pipeline.params import params_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_FILES = {"training_state.json", "ema.safetensors", "model.safetensors", "optimizer.bin",
                    "scheduler.bin", "random_states_0.pkl"}


def tiny(shards: Path, **train_values) -> dict:
    """Params of a tiny epsilon model (MLP, learned variance, importance-sampled random-t ELBO,
    the default params.yaml objective; float32) that trains in well under a second per 20 steps."""
    return {
        "data": {"out_dir": str(shards)},
        "diffusion": {"schedule": "cosine", "num_steps": 10},
        "model": {"formulation": "epsilon", "network": "mlp", "hidden_dim": 32, "depth": 1,
                  "variance": "learned_range", "dropout": 0.0},
        "train": {"objective": "random_t_elbo", "timestep_sampler": "importance", "lr": 1e-3, "batch_size": 16,
                  "max_steps": 20, "warmup_steps": 2, "mixed_precision": None, "val_every": 10,
                  "val_max_images": 100, "val_batch_size": 100, "val_chunk": 10, "checkpoint_every": 5,
                  "log_every": 5, "keep_checkpoints": 5} | train_values,
        "tracking": {"enabled": False},
    }


class Recorder(Tracker):
    """A tracker that keeps what it is given."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, int, float]] = []
        self.params: dict = {}
        self.tags: dict = {}
        self.artifacts: list[str] = []

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step):
        self.metrics += [(name, step, value) for name, value in metrics.items()]

    def log_artifacts(self, paths, folder=None):
        self.artifacts += [str(p) for p in paths]

    def steps(self, name: str) -> list[int]:
        return [step for n, step, _ in self.metrics if n == name]

    def value(self, name: str, step: int) -> float:
        (value,) = [v for n, s, v in self.metrics if n == name and s == step]
        return value


def run(values: dict, recorder: Recorder | None = None, stop: StopSignal | None = None):
    params = params_from_dict(copy.deepcopy(values))
    return train(params.model, params.diffusion, params.train, params.data.out_dir,
                 make_tracker=(lambda run_id: recorder) if recorder else None, stop=stop)


def step_dirs(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(("step-", ".tmp-", ".old-")))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, (
        f"{what}: {different} differ (max |diff| "
        f"{max((a[k].double() - b[k].double()).abs().max().item() for k in different):.3g})"
    )


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final model, last checkpoint (online weights, EMA, optimizer) and curve."""
    assert_same_tensors(load_file(a / "models/model.safetensors"), load_file(b / "models/model.safetensors"),
                        "models/model.safetensors")
    last_a, last_b = sorted((a / "checkpoints").glob("step-*"))[-1], sorted((b / "checkpoints").glob("step-*"))[-1]
    assert last_a.name == last_b.name
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(load_file(last_a / name), load_file(last_b / name), f"{last_a.name}/{name}")
    opt_a = torch.load(last_a / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(last_b / "optimizer.bin", weights_only=False)["state"]
    for key in opt_a:
        assert_same_tensors(opt_a[key], opt_b[key], f"optimizer state {key}")
    state_a = json.loads((last_a / "training_state.json").read_text())
    state_b = json.loads((last_b / "training_state.json").read_text())
    assert {k: v for k, v in state_a.items() if k != "run_id"} == {k: v for k, v in state_b.items() if k != "run_id"}
    assert (a / "plots/val_curve.tsv").read_text() == (b / "plots/val_curve.tsv").read_text()


# --------------------------------------------------------------------------- outputs


def test_short_run_writes_model_curve_and_checkpoints(tmp_path, monkeypatch, digits_shards):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder()
    result = run(tiny(digits_shards, max_steps=20, keep_checkpoints=2), recorder)
    assert result.step == 20 and result.best_step in (10, 20) and not result.stopped_early

    model = load_model(tmp_path / "models/model")
    assert (tmp_path / "models/model.json").is_file()
    config = model.config
    assert (config.network, config.diffusion.num_steps, config.image_shape, config.num_levels) == \
        ("mlp", 10, (1, 8, 8), 17)

    curve_path = tmp_path / "plots/val_curve.tsv"
    assert curve_path.read_text().splitlines()[0].split("\t") == list(CURVE_COLUMNS)
    curve = read_curve(curve_path)
    assert [row["step"] for row in curve] == [10, 20]
    for row in curve:
        assert row["val_bpd"] > 0
        assert row["val_bpd"] == pytest.approx(row["prior_bpd"] + row["diffusion_bpd"] + row["decoder_bpd"], rel=1e-4)
        assert row["val_bpd"] == pytest.approx(recorder.value("val/total_bpd", int(row["step"])), rel=1e-5)

    checkpoints = tmp_path / "checkpoints"
    assert step_dirs(checkpoints) == ["step-00000015", "step-00000020"]  # keep_checkpoints=2 pruned 5 and 10
    for directory in checkpoints.glob("step-*"):
        assert CHECKPOINT_FILES <= {p.name for p in directory.iterdir()}
        assert json.loads((directory / "training_state.json").read_text())["step"] == int(directory.name[5:])
    # the model is the EMA weights of the best validation
    assert_same_tensors(load_file(tmp_path / "models/model.safetensors"),
                        load_file(checkpoints / "best.safetensors"), "model vs best")

    assert recorder.steps("train/loss") == [5, 10, 15, 20]
    assert recorder.params["train"]["lr"] == 1e-3 and recorder.tags["data.manifest_sha256"] == manifest_hash(
        digits_shards)
    assert sorted(Path(p).name for p in recorder.artifacts) == ["model.json", "model.safetensors", "val_curve.tsv"]


@pytest.mark.parametrize(
    ("keep", "expected"), [(1, ["step-00000020"]), (3, ["step-00000010", "step-00000015", "step-00000020"])]
)
def test_keep_checkpoints(tmp_path, monkeypatch, digits_shards, keep, expected):
    monkeypatch.chdir(tmp_path)
    run(tiny(digits_shards, max_steps=20, val_every=20, keep_checkpoints=keep))
    assert step_dirs(tmp_path / "checkpoints") == expected


def test_val_bits_per_dim_goes_down_and_is_the_exact_elbo_of_the_model(tmp_path, monkeypatch, digits_shards):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder()
    values = tiny(digits_shards, max_steps=60, val_every=20, lr=5e-3, warmup_steps=5)
    result = run(values, recorder)
    curve = read_curve(tmp_path / "plots/val_curve.tsv")
    bpd = [row["val_bpd"] for row in curve]
    assert [row["step"] for row in curve] == [20, 40, 60]
    assert bpd[0] > bpd[1] > bpd[2], bpd
    assert bpd[2] < 0.9 * bpd[0], bpd
    # the curve is the exact val ELBO (all T terms) of the saved EMA weights
    t = values["train"]
    again = split_elbo(load_model(tmp_path / "models/model"), str(digits_shards), "val", t["val_batch_size"],
                       t["val_chunk"], 0, decoder="discretized", max_images=t["val_max_images"])
    assert again.count == t["val_max_images"]
    assert again.bits_per_dim()["total"] == pytest.approx(recorder.value("val/total_bpd", result.best_step), rel=1e-9)
    assert result.best_val_bpd == pytest.approx(min(bpd), rel=1e-5)


def test_val_max_images_splits_over_ranks(digits_shards):
    model = load_model_untrained()
    total = [split_elbo(model, str(digits_shards), "val", 32, 10, 0, rank, 2, max_images=75).count for rank in (0, 1)]
    assert total == [37, 38]
    assert split_elbo(model, str(digits_shards), "val", 500, 10, 0, max_images=5000).count == 350


def load_model_untrained():
    from ddgm.models import build_model

    params = params_from_dict(tiny(Path("unused")))
    torch.manual_seed(0)
    return build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17))



@pytest.mark.parametrize("decoder", ["discretized", "continuous"])
def test_train_bits_per_dim_is_logged_only_where_it_is_the_discrete_elbo(tmp_path, monkeypatch, digits_shards,
                                                                        decoder):
    """The ELBO objective's batch loss is -ELBO in nats per image; in bits/dim (train/neg_elbo_bpd,
    > 0) only with the discretized decoder: with the continuous one it is a density and can be < 0."""
    monkeypatch.chdir(tmp_path)
    values = tiny(digits_shards, max_steps=10, val_every=10)
    values["model"].update(variance="fixed_large", decoder=decoder)
    recorder = Recorder()
    run(values, recorder)
    names = {name for name, _, _ in recorder.metrics if name.startswith("train/")}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= names
    if decoder == "continuous":
        assert not [name for name in names if name.endswith("_bpd")], names
        return
    for step in recorder.steps("train/neg_elbo_bpd"):
        bits = recorder.value("train/loss", step) / (64 * math.log(2.0))
        assert recorder.value("train/neg_elbo_bpd", step) == pytest.approx(bits, rel=1e-12) and bits > 0
    assert recorder.steps("train/neg_elbo_bpd") == [5, 10]

# --------------------------------------------------------------------------- resume


def test_resume_picks_up_the_step_counter(tmp_path, monkeypatch, digits_shards, capsys):
    monkeypatch.chdir(tmp_path)
    run(tiny(digits_shards, max_steps=10))
    capsys.readouterr()
    recorder = Recorder()
    result = run(tiny(digits_shards, max_steps=20), recorder)  # max_steps may change on resume
    out = capsys.readouterr().out
    assert "resumed from checkpoints/step-00000010 at step 10" in out
    assert result.step == 20 and recorder.steps("train/loss") == [15, 20]
    assert [row["step"] for row in read_curve(tmp_path / "plots/val_curve.tsv")] == [10, 20]

    recorder = Recorder()
    result = run(tiny(digits_shards, max_steps=20), recorder)  # finished: nothing left to do
    assert "at step 20" in capsys.readouterr().out
    assert result.step == 20 and recorder.steps("train/loss") == []
    assert (tmp_path / "models/model.safetensors").is_file()


def _objective_with_global_rng(stop: StopSignal | None = None, stop_at: int = 0):
    """The real objective plus a tiny term drawn from the global torch RNG (as dropout would
    draw), optionally raising the stop flag at call ``stop_at``."""
    real = step_module.compute_objective
    calls = [0]

    def objective(*args, **kwargs) -> ObjectiveOutput:
        calls[0] += 1
        if stop is not None and calls[0] == stop_at:
            stop.received = True
        out = real(*args, **kwargs)
        return ObjectiveOutput(out.loss + 1e-3 * torch.rand(out.loss.shape), out.t, out.terms)

    return objective


def test_stop_flag_checkpoints_and_resume_is_bit_exact(tmp_path, monkeypatch, digits_shards, capsys):
    """Preempted at step 7 (grad_accum 2: micro-step 14) -> checkpoint step-7 -> rerun == never stopped,
    with the global RNG (dropout's) in play."""
    values = tiny(digits_shards, max_steps=20, grad_accum=2)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setattr(step_module, "compute_objective", _objective_with_global_rng())
    run(values)

    monkeypatch.chdir(tmp_path / "b")
    stop = StopSignal()
    monkeypatch.setattr(step_module, "compute_objective", _objective_with_global_rng(stop, stop_at=14))
    with pytest.raises(Preempted, match="step 7"):
        run(values, stop=stop)
    assert step_dirs(tmp_path / "b/checkpoints") == ["step-00000005", "step-00000007"]
    assert not (tmp_path / "b/models").exists()
    monkeypatch.setattr(step_module, "compute_objective", _objective_with_global_rng())
    capsys.readouterr()
    run(values)
    assert "at step 7" in capsys.readouterr().out
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_torn_checkpoints_are_ignored(tmp_path, monkeypatch, digits_shards, capsys):
    monkeypatch.chdir(tmp_path)
    run(tiny(digits_shards, max_steps=10))
    checkpoints = tmp_path / "checkpoints"
    # a save killed before the rename, and a step folder without ddgm's state
    torn = checkpoints / ".tmp-step-00000015"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"garbage")
    shutil.copytree(checkpoints / "step-00000010", checkpoints / "step-00000020")
    (checkpoints / "step-00000020/training_state.json").unlink()
    capsys.readouterr()
    result = run(tiny(digits_shards, max_steps=12))
    assert "resumed from checkpoints/step-00000010 at step 10" in capsys.readouterr().out
    assert result.step == 12
    assert not torn.exists()  # the next save removes what a killed save left
    assert json.loads((checkpoints / "step-00000012/training_state.json").read_text())["step"] == 12


def test_checkpoints_of_other_params_are_ignored_and_kept_aside(tmp_path, monkeypatch, digits_shards, capsys):
    monkeypatch.chdir(tmp_path)
    run(tiny(digits_shards, max_steps=20))
    old = json.loads((tmp_path / "checkpoints/step-00000020/training_state.json").read_text())["fingerprint"]
    capsys.readouterr()
    recorder = Recorder()
    result = run(tiny(digits_shards, max_steps=10, lr=2e-3), recorder)
    out = capsys.readouterr().out
    assert "ignoring checkpoints in checkpoints: they belong to other params" in out and "resumed" not in out
    assert result.step == 10 and recorder.steps("train/loss") == [5, 10]
    # the new run's checkpoints survive pruning; the old run's are moved aside, not deleted
    checkpoints = tmp_path / "checkpoints"
    assert step_dirs(checkpoints) == ["step-00000005", "step-00000010"]
    (aside,) = checkpoints.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["best.safetensors", "step-00000005", "step-00000010",
                                                      "step-00000015", "step-00000020"]
    new = json.loads((checkpoints / "step-00000010/training_state.json").read_text())["fingerprint"]
    assert new != old
    # and a rerun (e.g. after preemption) resumes the new run
    result = run(tiny(digits_shards, max_steps=15, lr=2e-3))
    assert "resumed from checkpoints/step-00000010 at step 10" in capsys.readouterr().out and result.step == 15


def test_fresh_start_does_not_inherit_the_old_runs_curve(tmp_path, monkeypatch, digits_shards):
    """Other params, stopped before their first validation, then resumed: the curve holds only
    the new run's rows (not the old run's row at step 10)."""
    monkeypatch.chdir(tmp_path)
    run(tiny(digits_shards, max_steps=20))
    assert [row["step"] for row in read_curve(tmp_path / "plots/val_curve.tsv")] == [10, 20]
    values = tiny(digits_shards, max_steps=20, val_every=20, lr=2e-3)
    stop = StopSignal()
    monkeypatch.setattr(step_module, "compute_objective", _objective_with_global_rng(stop, stop_at=12))
    with pytest.raises(Preempted):
        run(values, stop=stop)
    monkeypatch.setattr(step_module, "compute_objective", _objective_with_global_rng())
    run(values)
    assert [row["step"] for row in read_curve(tmp_path / "plots/val_curve.tsv")] == [20]


def test_resume_false_starts_from_scratch(tmp_path, monkeypatch, digits_shards, capsys):
    monkeypatch.chdir(tmp_path)
    run(tiny(digits_shards, max_steps=10))
    first = load_file(tmp_path / "models/model.safetensors")
    capsys.readouterr()
    recorder = Recorder()
    result = run(tiny(digits_shards, max_steps=10, resume=False), recorder)
    assert "resumed" not in capsys.readouterr().out
    assert result.step == 10 and recorder.steps("train/loss") == [5, 10]
    assert_same_tensors(first, load_file(tmp_path / "models/model.safetensors"), "rerun from scratch")
    assert step_dirs(tmp_path / "checkpoints") == ["step-00000005", "step-00000010"]
    assert len(list((tmp_path / "checkpoints").glob("superseded-*"))) == 1


def test_early_stop_stays_stopped_on_resume(tmp_path, monkeypatch, digits_shards):
    monkeypatch.chdir(tmp_path)
    totals = iter([1.0, 2.0, 3.0, 4.0])  # val nats: every validation after the first is worse

    def fake_split_elbo(model, *args, **kwargs):
        return SplitELBO(100, 0.0, next(totals), 0.0, torch.zeros(10), 64)

    monkeypatch.setattr(validator, "split_elbo", fake_split_elbo)
    values = tiny(digits_shards, max_steps=40, val_every=5, patience=1)
    result = run(values)
    assert (result.step, result.best_step, result.stopped_early) == (10, 5, True)
    assert step_dirs(tmp_path / "checkpoints")[-1] == "step-00000010"
    recorder = Recorder()
    result = run(values, recorder)  # e.g. rerun after a kill between the last checkpoint and models/
    assert (result.step, result.best_step, result.stopped_early) == (10, 5, True)
    assert recorder.steps("train/loss") == []


# --------------------------------------------------------------------------- processes: SIGKILL, SIGTERM


def _env() -> dict[str, str]:
    """subprocess_env with the caller's PATH, the repository first on PYTHONPATH, no launcher, DDGM_* or
    tracking settings."""
    return subprocess_env(unset=("ACCELERATE_USE_CPU", "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR", "MLFLOW_TRACKING_URI"),
                          venv_on_path=False, PYTHONPATH=repo_pythonpath())


def _process_params(shards: Path) -> dict:
    """Long enough (4 validations on the whole val split) to be stopped in the middle."""
    return tiny(shards, max_steps=40, grad_accum=2, val_every=10, val_max_images=None, val_batch_size=350)


def _train_process(workdir: Path) -> subprocess.Popen:
    with open(workdir / "train.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", "p.yaml"], cwd=workdir,
                                env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended (status {proc.returncode}) before {path} appeared:\n" + \
            (path.parents[1] / "train.log").read_text()[-3000:]
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def _workdir(base: Path, values: dict) -> Path:
    base.mkdir(parents=True)
    (base / "p.yaml").write_text(yaml.safe_dump(values))
    return base


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_shards) -> Path:
    """The reference: pipeline.train run to the end without interruption."""
    workdir = _workdir(tmp_path_factory.mktemp("uninterrupted") / "run", _process_params(digits_shards))
    proc = _train_process(workdir)
    try:
        assert proc.wait(timeout=300) == 0, (workdir / "train.log").read_text()[-3000:]
    finally:
        kill_group(proc)
    return workdir


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_weights_bit_for_bit(tmp_path, digits_shards, uninterrupted):
    workdir = _workdir(tmp_path / "run", _process_params(digits_shards))
    proc = _train_process(workdir)
    try:
        _wait_for(proc, workdir / "checkpoints/step-00000010")
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        kill_group(proc)
    assert not (workdir / "models").exists()
    latest = sorted((workdir / "checkpoints").glob("step-*"))[-1].name
    assert "step-00000010" <= latest < "step-00000040"
    proc = _train_process(workdir)
    try:
        assert proc.wait(timeout=300) == 0, (workdir / "train.log").read_text()[-3000:]
    finally:
        kill_group(proc)
    assert f"resumed from checkpoints/{latest}" in (workdir / "train.log").read_text()
    assert_same_run(uninterrupted, workdir)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_exits_75_and_resumes_bit_for_bit(tmp_path, digits_shards, uninterrupted):
    workdir = _workdir(tmp_path / "run", _process_params(digits_shards))
    proc = _train_process(workdir)
    try:
        _wait_for(proc, workdir / "checkpoints/step-00000010")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, (workdir / "train.log").read_text()[-3000:]
    finally:
        kill_group(proc)
    log = (workdir / "train.log").read_text()
    stopped = int(log.split("stopped by signal at step ")[1].split(";")[0])
    assert 10 <= stopped < 40
    assert sorted(p.name for p in (workdir / "checkpoints").glob("step-*"))[-1] == f"step-{stopped:08d}"
    assert not (workdir / "models").exists()
    proc = _train_process(workdir)
    try:
        assert proc.wait(timeout=300) == 0, (workdir / "train.log").read_text()[-3000:]
    finally:
        kill_group(proc)
    assert f"resumed from checkpoints/step-{stopped:08d} at step {stopped}" in (workdir / "train.log").read_text()
    assert_same_run(uninterrupted, workdir)


# --------------------------------------------------------------------------- non-finite loss


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, digits_shards):
    monkeypatch.chdir(tmp_path)
    real, calls, digests = step_module.compute_objective, [0], {}
    checkpoint = tmp_path / "checkpoints/step-00000005"

    def objective(*args, **kwargs):
        calls[0] += 1
        out = real(*args, **kwargs)
        if calls[0] == 8:
            digests.update({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()})
            return ObjectiveOutput(out.loss * float("nan"), out.t, out.terms)
        return out

    monkeypatch.setattr(step_module, "compute_objective", objective)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 8"):
        run(tiny(digits_shards, max_steps=20))
    assert step_dirs(tmp_path / "checkpoints") == ["step-00000005"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in checkpoint.iterdir()} == digests
    assert json.loads((checkpoint / "training_state.json").read_text())["step"] == 5
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------------------- config errors


def _shards_without_shard_files(root: Path, shards: Path) -> Path:
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(shards / "manifest.json", bare / "manifest.json")
    return bare


BAD_PARAMS = {
    "batch layout": ({"train": {"batch_size": 15, "grad_accum": 2}}, ValueError,
                     "train.batch_size=15 is not divisible by processes x grad_accum = 1 x 2"),
    "no shards dir": ({"data": {"out_dir": "{other}/missing"}}, FileNotFoundError,
                      "manifest not found: {other}/missing/manifest.json"),
    "manifest without shards": ({"data": {"out_dir": "{other}/bare"}}, FileNotFoundError,
                                "shard not found: {other}/bare/train-000000.tar"),
    "negative lr": ({"train": {"lr": -1e-3}}, ValueError, "train.lr must be > 0"),
    "unknown key": ({"train": {"learning_rate": 1e-3}}, ValueError, "unknown params key train.learning_rate"),
    "objective": ({"train": {"objective": "elbo"}}, ValueError, "train.objective must be one of"),
    "network": ({"model": {"network": "resnet"}}, ValueError, "model.network must be one of"),
    "schedule": ({"diffusion": {"schedule": "quadratic"}}, ValueError, "diffusion.schedule must be one of"),
    "objective vs model": ({"train": {"objective": "hybrid"}, "model": {"variance": "fixed_large"}}, ValueError,
                           "model.variance must be 'learned_range'"),
    "val_max_images": ({"train": {"val_max_images": 0}}, ValueError, "train.val_max_images must be > 0"),
    "importance t with L_simple": ({"train": {"objective": "simple"}}, ValueError,
                                   "train.timestep_sampler 'importance' draws t by the running size"),
    "importance t with the full ELBO": ({"train": {"objective": "full_elbo"}}, ValueError,
                                        "set train.timestep_sampler to 'uniform'"),
    "compile mode": ({"train": {"compile_mode": "fastest"}}, ValueError, "train.compile_mode must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_config_fails_before_any_work(tmp_path, tmp_path_factory, monkeypatch, digits_shards, restore_signals,
                                          case):
    from pipeline.train import main

    other = tmp_path_factory.mktemp("other")
    _shards_without_shard_files(other, digits_shards)
    change, error, message = BAD_PARAMS[case]
    values = tiny(digits_shards)
    values["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"}
    for section, entries in change.items():
        values[section].update({k: v.format(other=other) if isinstance(v, str) else v for k, v in entries.items()})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as raised:
        main(["--params", "p.yaml"])
    assert message.format(other=other) in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # no models/, checkpoints/, plots/, mlflow.db


# --------------------------------------------------------------------------- MLflow


@pytest.mark.slow
def test_mlflow_run_holds_params_metrics_tags_artifacts_and_resumes(tmp_path, monkeypatch, digits_shards,
                                                                     restore_signals):
    from mlflow.tracking import MlflowClient

    from pipeline.train import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    values = tiny(digits_shards, max_steps=20)
    values["tracking"] = {"enabled": True, "uri": uri, "experiment": "training-test"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    assert main(["--params", "p.yaml"]) == 0

    run_id = json.loads((tmp_path / "models/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.lr"] == "0.001" and params["train.batch_size"] == "16"
    assert params["model.network"] == "mlp" and params["num_processes"] == "1"
    tags = found.data.tags
    assert tags["data.manifest_sha256"] == manifest_hash(digits_shards) and tags["git.commit"]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 10, 15, 20]
    history = client.get_metric_history(run_id, "val/total_bpd")
    curve = read_curve(tmp_path / "plots/val_curve.tsv")
    assert [(m.step, pytest.approx(m.value, rel=1e-5)) for m in history] == [(r["step"], r["val_bpd"]) for r in curve]
    assert sorted(a.path for a in client.list_artifacts(run_id, "model")) == [
        "model/model.json", "model/model.safetensors", "model/val_curve.tsv"]
    assert len(client.get_run(run_id).outputs.model_outputs) == 1  # the pyfunc sampler (the Models column)

    values["train"]["max_steps"] = 30  # resume: the same run goes on
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    assert main(["--params", "p.yaml"]) == 0
    assert json.loads((tmp_path / "models/run.json").read_text())["run_id"] == run_id
    experiment = client.get_experiment_by_name("training-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_tracking_server_warns_once_and_training_goes_on(tmp_path, monkeypatch, digits_shards,
                                                                      restore_signals):
    from pipeline.train import main

    port = free_port()  # its probing socket is closed again: nothing listens there
    monkeypatch.chdir(tmp_path)
    values = tiny(digits_shards, max_steps=10)
    values["tracking"] = {"enabled": True, "uri": f"http://127.0.0.1:{port}"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    with pytest.warns(RuntimeWarning) as warned:
        assert main(["--params", "p.yaml"]) == 0
    mlflow_warnings = [w for w in warned if "MLflow tracking" in str(w.message)]
    assert len(mlflow_warnings) == 1, [str(w.message) for w in warned]
    assert f"127.0.0.1:{port}" in str(mlflow_warnings[0].message)
    assert (tmp_path / "models/model.safetensors").is_file() and (tmp_path / "checkpoints/step-00000010").is_dir()


def test_fingerprint_covers_params_data_and_code(monkeypatch):
    params = params_from_dict({"model": {"network": "mlp", "hidden_dim": 32, "depth": 1}})
    config, train_config = ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17), params.train
    base = fingerprint.fingerprint(train_config, config, "data-a")
    assert base == fingerprint.fingerprint(train_config, config, "data-a")
    assert base != fingerprint.fingerprint(train_config, config, "data-b")  # new shards: start over
    train_config.max_steps += 100  # more steps may continue the same run
    train_config.checkpoint_dir = "elsewhere"  # so may checkpoints copied to another folder
    assert base == fingerprint.fingerprint(train_config, config, "data-a")
    train_config.lr *= 2
    assert base != fingerprint.fingerprint(train_config, config, "data-a")
    train_config.lr /= 2
    monkeypatch.setattr(fingerprint, "code_hash", lambda: "other code")
    assert base != fingerprint.fingerprint(train_config, config, "data-a")  # changed library code: start over


@pytest.mark.parametrize(("sampler", "uniform_mix"), [("importance", 0.001), ("importance", 0.5), ("uniform", 0.5)])
def test_training_step_draws_t_from_the_configured_sampler(tmp_path, sampler, uniform_mix):
    from accelerate import Accelerator

    from ddgm.timestep_sampler import ImportanceSampler

    params = params_from_dict(tiny(tmp_path, timestep_sampler=sampler, uniform_mix=uniform_mix))
    config = ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17)
    training_step = step_module.build_training_step(params.train, config, Accelerator(cpu=True))
    assert isinstance(training_step.sampler, ImportanceSampler) == (sampler == "importance")
    if sampler == "importance":
        assert training_step.sampler.uniform_mix == uniform_mix


def test_ema_decay_is_the_ceiling_of_the_ema_warm_up(tmp_path):
    """ema-pytorch warms the EMA decay up: update n uses min(train.ema_decay, 1 - n^(-2/3)). params.yaml
    and the README say so (0.997 at the default 6000 steps; 0.999 only from update 31,623 on)."""
    from accelerate import Accelerator

    params = params_from_dict(tiny(tmp_path, ema_decay=0.999))
    config = ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17)
    ema = step_module.build_training_step(params.train, config, Accelerator(cpu=True)).ema
    for updates, decay in ((6000, 1 - 6000 ** (-2 / 3)), (20_000, 1 - 20_000 ** (-2 / 3)), (40_000, 0.999),
                           (100_000, 0.999)):
        ema.step.fill_(updates)  # the count after the update that reads the decay
        assert ema.get_current_decay() == pytest.approx(decay, abs=1e-6), updates
    assert 1 - 6000 ** (-2 / 3) == pytest.approx(0.997, abs=5e-4)
