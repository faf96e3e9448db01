"""A stage that fails on bad input prints one line naming the file or parameter and what to do,
exits 1, and shows no traceback unless DDGM_TRACEBACK=1; unexpected errors keep their traceback
(issue 16, item 4). Nothing is written before a bad parameter or a required tracking store fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import free_port, repo_pythonpath, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(shards: Path | str, **train) -> dict:
    return {"data": {"out_dir": str(shards)}, "diffusion": {"num_steps": 10},
            "model": {"network": "mlp", "hidden_dim": 32, "depth": 1},
            "train": {"batch_size": 16, "max_steps": 10, "warmup_steps": 2, "mixed_precision": None, "val_every": 10,
                      "val_max_images": 100, "val_batch_size": 100, "val_chunk": 10, "checkpoint_every": 10} | train,
            "tracking": {"enabled": False}, "compute": {"threads": 1}}


def run_in_process(stage: str, values: dict, workdir: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run ``stage``'s process entry point (what its ``__main__`` runs) in ``workdir`` on ``values``; its status
    and its stderr."""
    import importlib

    from pipeline.errors import run_reporting_input_errors
    from pipeline.stage import run_stage

    (workdir / "p.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("DDGM_TRACEBACK", raising=False)
    capsys.readouterr()
    entry = run_reporting_input_errors if stage == "prepare" else run_stage  # prepare sets no thread count
    status = entry(importlib.import_module(f"pipeline.{stage}").main, ["--params", "p.yaml"])
    return status, capsys.readouterr().err


def assert_one_line(stderr: str, stage: str, *names: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{stage}: error: ") and "Traceback" not in stderr, stderr
    for name in names:
        assert name in lines[0], lines[0]


def test_missing_shard(tmp_path, digits_shards, monkeypatch, capsys, restore_signals):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(digits_shards / "manifest.json", shards / "manifest.json")
    status, err = run_in_process("train", tiny(shards), tmp_path, monkeypatch, capsys)
    assert status == 1
    assert_one_line(err, "train", str(shards / "train-000000.tar"), "dvc repro -f prepare")


def test_truncated_shard(tmp_path, digits_shards, monkeypatch, capsys, restore_signals):
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    shard = shards / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    status, err = run_in_process("train", tiny(shards), tmp_path, monkeypatch, capsys)
    assert status == 1
    assert_one_line(err, "train", str(shard), "dvc repro -f prepare")
    assert not (tmp_path / "models").exists()


def test_unreadable_image(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from pipeline.errors import run_reporting_input_errors
    from pipeline.prepare import main

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("L", (8, 8), color=i * 40).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"source": "folder", "path": str(images),
                                                              "out_dir": str(tmp_path / "shards")}}))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run_reporting_input_errors(main, ["--params", "p.yaml"]) == 1
    assert_one_line(capsys.readouterr().err, "prepare", str(images / "broken.png"), "data.skip_bad")
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize(("stage", "change", "names"), [
    ("prepare", {"data": {"val_fraction": 1.5, "out_dir": "shards"}}, ["data.val_fraction"]),
    ("train", {"train": {"lr": -1.0}}, ["train.lr must be > 0", "params file"]),
    ("train", {"train": {"learning_rate": 0.1}}, ["unknown params key train.learning_rate", "params file"]),
    ("train", {"compute": {"threads": 0}}, ["compute.threads must be an integer >= 1"]),
    ("sample", {"sample": {"sampler": "euler"}}, ["sample.sampler must be one of"]),
    ("evaluate", {"evaluate": {"comparison_steps": [0]}}, ["evaluate.comparison_steps"]),
])
def test_bad_parameter(tmp_path, digits_shards, monkeypatch, capsys, restore_signals, stage, change, names):
    """Each stage's entry point stops on a bad key of the params it reads, in one line naming the key, before
    writing anything (train, sample and evaluate find the shards they read: only the key can stop them)."""
    values = tiny(digits_shards)
    for section, entries in change.items():
        values.setdefault(section, {}).update(entries)
    status, err = run_in_process(stage, values, tmp_path, monkeypatch, capsys)
    assert status == 1
    assert_one_line(err, stage, *names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_unreachable_tracking_server_when_tracking_is_required(tmp_path, digits_shards, monkeypatch, capsys,
                                                               restore_signals):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    values = tiny(digits_shards)
    values["tracking"] = {"enabled": True, "uri": uri, "required": True}
    status, err = run_in_process("train", values, tmp_path, monkeypatch, capsys)
    assert status == 1
    assert_one_line(err, "train", uri, "tracking.required: false")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # it stopped before any work


def test_missing_model(tmp_path, monkeypatch, capsys):
    values = tiny("data/shards")
    status, err = run_in_process("sample", values, tmp_path, monkeypatch, capsys)
    assert status == 1
    assert_one_line(err, "sample", "models/model.json")


def test_unexpected_errors_and_DDGM_TRACEBACK_keep_the_traceback(tmp_path, monkeypatch):
    from pipeline.errors import run_reporting_input_errors

    def broken(argv):
        return {}["missing key"]

    with pytest.raises(KeyError):
        run_reporting_input_errors(broken, [])

    def bad_input(argv):
        raise FileNotFoundError("file not found: x.tar")

    assert run_reporting_input_errors(bad_input, []) == 1
    monkeypatch.setenv("DDGM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        run_reporting_input_errors(bad_input, [])


def test_stage_process_exit_status_and_stderr(tmp_path):
    """`python -m pipeline.train --params bad.yaml`, as DVC runs it: status 1, one line on stderr naming the key,
    nothing written. (DDGM_TRACEBACK=1 is tested in process above.)"""
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny(tmp_path / "nowhere", lr=-1.0)))
    env = subprocess_env(venv_on_path=False, PYTHONPATH=repo_pythonpath(), DDGM_TRACEBACK=None)
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "bad.yaml"], check=False, cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert_one_line(r.stderr, "train", "train.lr must be > 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
