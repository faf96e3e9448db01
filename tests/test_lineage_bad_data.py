"""Bad data gets an error naming it, and nothing half-written: each bad input folder stops prepare with the
file (or folder) named and the previous good shards untouched; shards that do not match their manifest's
hashes stop training with the shard named and no model written (a truncated shard: tests/test_errors.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from support import scaled

from ddgm.data import DataError, DataParams, prepare_dataset, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array) if mode is None else Image.fromarray(array, mode)).save(path)


def _good_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        _save(root / f"{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return root


def _truncate(folder: Path) -> str:
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])
    return r"cannot read image .*1\.png"


def _text_as_png(folder: Path) -> str:
    (folder / "notes.png").write_text("these are notes, not an image")
    return r"cannot read image .*notes\.png: not a PNG or JPEG image"


def _gif_as_png(folder: Path) -> str:
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(folder / "anim.png", format="GIF")
    return r"cannot read image .*anim\.png: not a PNG or JPEG image"


def _sixteen_bit(folder: Path) -> str:
    _save(folder / "deep.png", np.full((16, 16), 4000, dtype=np.uint16))
    return r"cannot read image .*deep\.png: image mode I;16 has more than 8 bits per channel"


def _mixed_sizes(folder: Path) -> str:
    _save(folder / "wide.png", np.zeros((16, 20), dtype=np.uint8))
    return r"different sizes: .*0\.png is 16x16 but .*wide\.png is 20x16"


def _emptied(folder: Path) -> str:
    shutil.rmtree(folder)
    folder.mkdir()
    return r"no images found in folder .*in"


BAD_FOLDERS: dict[str, Callable[[Path], str]] = {
    "truncated png": _truncate,
    "text named .png": _text_as_png,
    "gif named .png": _gif_as_png,
    "16-bit png": _sixteen_bit,
    "mixed sizes": _mixed_sizes,
    "empty folder": _emptied,
}


@pytest.mark.parametrize("kind", sorted(BAD_FOLDERS))
def test_bad_folder_is_named_and_previous_shards_stay(kind, tmp_path):
    folder = _good_folder(tmp_path / "in")
    params = DataParams(source="folder", path=str(folder), val_fraction=0, test_fraction=0)
    out = tmp_path / "shards"
    prepare_dataset(params, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    match = BAD_FOLDERS[kind](folder)
    with pytest.raises(DataError, match=match):
        prepare_dataset(params, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "shards"]  # no staging directory left


def test_skip_bad_records_each_skipped_file_and_why(tmp_path):
    folder = _good_folder(tmp_path / "in")
    for make_bad in (_truncate, _text_as_png, _sixteen_bit):
        make_bad(folder)
    params = DataParams(source="folder", path=str(folder), val_fraction=0, test_fraction=0, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        prepare_dataset(params, tmp_path / "out")
    raw = read_manifest(tmp_path / "out").raw_inputs
    reasons = {entry["file"]: entry["reason"] for entry in raw.skipped}
    assert sorted(reasons) == ["1.png", "deep.png", "notes.png"] and raw.files_read == 3
    assert "truncated" in reasons["1.png"] and "more than 8 bits" in reasons["deep.png"]
    assert "not a PNG or JPEG" in reasons["notes.png"]


def test_mixed_modes_of_8_bit_images_become_one_colour_dataset(tmp_path):
    folder = tmp_path / "in"
    _save(folder / "grey.png", np.full((3, 3), 10, dtype=np.uint8))
    _save(folder / "rgb.png", np.full((3, 3, 3), 20, dtype=np.uint8))
    _save(folder / "rgba.png", np.full((3, 3, 4), 30, dtype=np.uint8))
    Image.fromarray(np.full((3, 3), 5, dtype=np.uint8)).convert("P").save(folder / "palette.png")
    _save(folder / "bilevel.png", np.ones((3, 3), dtype=bool))
    params = DataParams(source="folder", path=str(folder), val_fraction=0, test_fraction=0)
    manifest = prepare_dataset(params, tmp_path / "out")
    assert manifest.image_shape == (3, 3, 3) and manifest.splits["train"] == 5


# --------------------------------------------------------------------------- at train time

TINY = {
    "diffusion": {"num_steps": 10},
    "model": {"network": "mlp", "hidden_dim": 16, "depth": 1},
    # mixed_precision: one per process (Accelerate's state), the launcher's as in the suite's other in-process runs
    "train": {"mixed_precision": None, "max_steps": 4, "warmup_steps": 1, "batch_size": 32, "val_every": 4,
              "val_batch_size": 350, "val_chunk": 10, "checkpoint_every": 4, "log_every": 2},
}


def test_shards_that_do_not_match_their_hashes_stop_training_with_the_shard_named(
        digits_shards, tmp_path, monkeypatch, capsys, restore_signals, single_thread):
    """Two shards' bytes exchanged: every file is a valid tar, but not the one the manifest hashes."""
    from pipeline.stage import run_stage
    from pipeline.train import main

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    a, b = shards / "train-000000.tar", shards / "train-000001.tar"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    values = scaled(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    values["data"]["out_dir"] = str(shards)
    values["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    for name in ("DDGM_SHARDS", "DDGM_CHECKPOINT_DIR", "DDGM_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DDGM_CACHE_DIR", str(tmp_path / "cache"))  # no record of these shards' earlier check
    capsys.readouterr()
    assert run_stage(main, ["--params", "params.yaml"]) == 1
    stderr = capsys.readouterr().err
    assert a.name in stderr, stderr[-3000:]
    assert not (tmp_path / "models" / "model.safetensors").exists()
