"""Data lineage: the raw inputs are a DVC dependency of prepare, and the manifest records their content hash
and which files were read, skipped (and why) and ignored.

End to end: a throw-away git + DVC project with this repository's pipeline, pointed at an image folder
outside it; adding, removing, renaming or editing one image makes `dvc status` report prepare as changed
and `dvc repro` prepare again with a new content hash; an unchanged folder prepares nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from support import DVC_GIT_ENV, subprocess_env

from ddgm.data import DataParams, prepare_dataset, read_manifest
from ddgm.data.digits import DIGITS_LOCATION, DIGITS_PATH

ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image_folder(root: Path, count: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        _save(root / ("a" if i % 2 else "b") / f"{i}.png", rng.integers(0, 256, (5, 5), dtype=np.uint8))
    return root


def _sha256sum_listing(root: Path, files: list[str]) -> str:
    """The content hash written independently: sha256 of `sha256sum`'s output for the files, sorted by path."""
    lines = "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n" for f in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _raw(folder: Path, out: Path, **kw) -> dict:
    params = DataParams(source="folder", path=str(folder), val_fraction=0, test_fraction=0, **kw)
    prepare_dataset(params, out)
    return read_manifest(out).raw_inputs.to_record()


def test_manifest_records_content_hash_and_files_read_skipped_ignored(tmp_path):
    folder = _image_folder(tmp_path / "in")
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / "b" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="broken.png"):
        raw = _raw(folder, tmp_path / "out", skip_bad=True)
    inputs = [p.relative_to(folder).as_posix() for p in folder.rglob("*.png")]
    assert raw["sha256"] == _sha256sum_listing(folder, inputs)
    assert (raw["files_read"], raw["files_skipped"], raw["files_ignored"]) == (6, 1, 1)
    assert raw["skipped"] == [{"file": "b/broken.png", "reason": raw["skipped"][0]["reason"]}]
    assert "not a PNG or JPEG image" in raw["skipped"][0]["reason"]
    assert raw["ignored"] == ["a/notes.txt"] and raw["location"] == str(folder)


def test_content_hash_follows_every_kind_of_change_and_only_those(tmp_path):
    folder = _image_folder(tmp_path / "in")
    first = _raw(folder, tmp_path / "o")["sha256"]
    assert _raw(folder, tmp_path / "o")["sha256"] == first  # unchanged folder
    (folder / "a" / "readme.txt").write_text("ignored")
    assert _raw(folder, tmp_path / "o")["sha256"] == first  # not an input
    seen = {first}
    edits = [
        lambda: _save(folder / "a" / "1.png", np.zeros((5, 5), dtype=np.uint8)),  # edit one image
        lambda: _save(folder / "a" / "new.png", np.ones((5, 5), dtype=np.uint8)),  # add one
        lambda: (folder / "b" / "0.png").unlink(),  # remove one
        lambda: (folder / "b" / "2.png").rename(folder / "a" / "2.png"),  # move to another class
    ]
    for edit in edits:
        edit()
        digest = _raw(folder, tmp_path / "o")["sha256"]
        assert digest not in seen
        seen.add(digest)


def test_array_and_digits_sources_record_their_raw_inputs(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(10 * 9, dtype=np.uint8).reshape(10, 3, 3))
    prepare_dataset(DataParams(source="array", path=str(tmp_path / "x.npy")), tmp_path / "a")
    raw = read_manifest(tmp_path / "a").raw_inputs
    assert raw.sha256 == _sha256sum_listing(tmp_path, ["x.npy"]) and raw.files_read == 1
    prepare_dataset(DataParams(path=DIGITS_PATH), tmp_path / "d")
    digits = read_manifest(tmp_path / "d")
    assert digits.raw_inputs.location == DIGITS_LOCATION and digits.raw_inputs.files_read == 2
    assert digits.source["path"] is None  # the dataset is the same with and without the tracked module


# --------------------------------------------------------------------------- DVC end to end


def _dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env(unset=("PYTHONPATH", "DDGM_SHARDS"), **DVC_GIT_ENV)
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, f"dvc {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def pipeline_project(dest: Path, data: dict) -> Path:
    """A git + DVC project holding this repository's library, stages and dvc.yaml, with ``data`` set in params.yaml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ddgm", "pipeline"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "dvc.yaml", dest / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = subprocess_env(**DVC_GIT_ENV)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    _dvc(dest, "init", "-q")
    return dest


def _prepare_state(project: Path) -> tuple[str, bool]:
    """(`dvc status prepare` output, whether `dvc repro prepare` ran the stage)."""
    status = _dvc(project, "status", "prepare").stdout
    ran = "Running stage 'prepare'" in _dvc(project, "repro", "prepare").stdout
    return status, ran


@pytest.mark.slow
def test_dvc_tracks_an_outside_image_folder_through_prepare(tmp_path):
    folder = _image_folder(tmp_path / "images", count=8)
    project = pipeline_project(tmp_path / "project", {"source": "folder", "path": str(folder), "image_size": 4})
    manifest = project / "data" / "shards" / "manifest.json"
    status, ran = _prepare_state(project)
    assert ran and manifest.is_file()
    hashes = [read_manifest(manifest).raw_inputs.sha256]
    status, ran = _prepare_state(project)
    assert not ran and "changed" not in status, status  # an unchanged folder prepares nothing
    changes = {
        "edit": lambda: _save(folder / "a" / "1.png", np.full((5, 5), 9, dtype=np.uint8)),
        "add": lambda: _save(folder / "b" / "extra.png", np.full((5, 5), 7, dtype=np.uint8)),
        "remove": lambda: (folder / "a" / "3.png").unlink(),
    }
    for change in changes.values():
        before = manifest.read_bytes()
        change()
        status, ran = _prepare_state(project)
        assert "prepare:" in status and "changed deps" in status and str(folder) in status, status
        assert ran and manifest.read_bytes() != before
        hashes.append(read_manifest(manifest).raw_inputs.sha256)
        assert len(set(hashes)) == len(hashes)
    status, ran = _prepare_state(project)
    assert not ran and "changed" not in status, status  # each repro recorded its folder
    assert read_manifest(manifest).raw_inputs.files_read == 8


def _exp_show_dep_hash(project: Path, dep: str) -> str:
    """The hash `dvc exp show` lists for dependency ``dep`` in the workspace."""
    rows = json.loads(_dvc(project, "exp", "show", "--json").stdout)
    (workspace,) = [row for row in rows if row["rev"] == "workspace"]
    return workspace["data"]["deps"][dep]["hash"]


@pytest.mark.slow
def test_dvc_added_folder_inside_the_repository_is_a_versioned_input(tmp_path):
    project = pipeline_project(tmp_path / "project", {"source": "folder", "path": "images"})
    folder = _image_folder(project / "images")
    _dvc(project, "add", "images")
    env = subprocess_env(**DVC_GIT_ENV)
    subprocess.run(["git", "add", "-A"], cwd=project, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "images"], cwd=project, env=env, check=True)  # exp show needs a commit
    _dvc(project, "repro", "prepare")
    shown = _exp_show_dep_hash(project, "images")
    assert shown == yaml.safe_load((project / "images.dvc").read_text())["outs"][0]["md5"]
    first = read_manifest(project / "data" / "shards").raw_inputs.sha256
    _save(folder / "a" / "1.png", np.full((5, 5), 3, dtype=np.uint8))
    status, ran = _prepare_state(project)
    assert "prepare:" in status and "modified:           images" in status and ran, status
    assert read_manifest(project / "data" / "shards").raw_inputs.sha256 != first
    assert yaml.safe_load((project / "images.dvc").read_text())["outs"][0]["md5"] != shown  # the new version
    assert _exp_show_dep_hash(project, "images") != shown


@pytest.mark.slow
def test_bad_image_added_to_tracked_folder_stops_repro_and_keeps_the_shards(tmp_path):
    folder = _image_folder(tmp_path / "images")
    project = pipeline_project(tmp_path / "project", {"source": "folder", "path": str(folder)})
    _dvc(project, "repro", "prepare")
    shards = project / "data" / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    good = (folder / "a" / "1.png").read_bytes()
    (folder / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    r = _dvc(project, "repro", "prepare", check=False)
    assert r.returncode != 0 and "cut.png" in r.stdout + r.stderr
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert "changed deps" in _dvc(project, "status", "prepare").stdout  # still to do, not recorded as done
