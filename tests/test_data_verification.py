"""Up-front shard checks once per dataset version: recorded, skipped while nothing changed, redone for
a shard whose size or modification time changed, and never leaving a waiting process behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ddgm.data import DataError, verify_once
from ddgm.data.verification import record_path, unchecked_shards, verify_recorded

SPLITS = ["train", "val"]  # 8 + 3 shards


@pytest.fixture
def dataset(digits_shards, tmp_path, monkeypatch) -> Path:
    """A copy of the session's digits shards (conftest), with its own verification record folder."""
    monkeypatch.setenv("DDGM_CACHE_DIR", str(tmp_path / "cache"))
    return Path(shutil.copytree(digits_shards, tmp_path / "shards"))


def _flip_byte(path: Path, offset: int = 3000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_checked_once_then_skipped_until_a_shard_changes(dataset):
    assert verify_recorded(dataset, SPLITS) == 11
    assert verify_recorded(dataset, SPLITS) == 0
    assert verify_recorded(dataset, ["train", "val", "test"]) == 4  # only the test shards are new
    assert not any(p.name.startswith(".") or (p.suffix == ".json" and p.name != "manifest.json")
                   for p in dataset.iterdir())  # the record is not written into the dataset
    shard = dataset / "val-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert [url for url, _ in unchecked_shards(dataset, SPLITS)] == [str(shard)]
    assert verify_recorded(dataset, SPLITS) == 1


def test_a_shard_changed_after_the_check_is_caught(dataset):
    verify_recorded(dataset, SPLITS)
    _flip_byte(dataset / "train-000002.tar")
    with pytest.raises(DataError, match=r"shard .*train-000002\.tar has sha256"):
        verify_recorded(dataset, SPLITS)
    with pytest.raises(DataError, match=r"shard .*train-000002\.tar has sha256"):  # not recorded as good
        verify_recorded(dataset, SPLITS)


def test_the_record_belongs_to_one_dataset_version_and_place(dataset, tmp_path):
    verify_recorded(dataset, SPLITS)
    moved = Path(shutil.copytree(dataset, tmp_path / "elsewhere"))
    assert record_path(moved) != record_path(dataset)
    assert verify_recorded(moved, SPLITS) == 11


def test_a_missing_shard_is_named(dataset):
    (dataset / "val-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*val-000002\.tar"):
        verify_recorded(dataset, SPLITS)


def test_waiting_processes_learn_the_outcome(dataset):
    barrier = []
    verify_once(dataset, SPLITS, checker=True, wait=lambda: barrier.append("checker"))
    verify_once(dataset, SPLITS, checker=False, wait=lambda: barrier.append("other"))  # trusts the record
    assert barrier == ["checker", "other"]
    _flip_byte(dataset / "train-000005.tar")
    os.utime(dataset / "train-000005.tar", ns=(0, 0))
    with pytest.raises(DataError, match=r"train-000005\.tar has sha256"):
        verify_once(dataset, SPLITS, checker=True, wait=lambda: barrier.append("checker"))
    # the checker failed and recorded nothing for that shard: the others check it themselves
    with pytest.raises(DataError, match=r"train-000005\.tar has sha256"):
        verify_once(dataset, SPLITS, checker=False, wait=lambda: barrier.append("other"))
    assert barrier[-2:] == ["checker", "other"]  # both reached the barrier before raising


def test_an_unwritable_cache_costs_only_a_warning(dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DDGM_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="cannot record the checked shards"):
        assert verify_recorded(dataset, SPLITS) == 11
    verify_once(dataset, SPLITS, checker=False, wait=lambda: None)  # no record: checks itself, passes
