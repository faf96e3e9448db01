"""prepare stage: sources -> shards + manifest; round trips, determinism, atomic output, params."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from support import sha256_file

from ddgm.data import DataError, DataParams, load_split, manifest_hash, prepare_dataset, read_manifest
from pipeline.params_file import load_section
from pipeline.prepare import main as prepare_main

SPLITS = ("train", "val", "test")


def _all_samples(out: Path) -> list[tuple[bytes, int]]:
    """Every stored (pixel bytes, label) over all splits, sorted, for comparison as a multiset."""
    result = []
    for split in SPLITS:
        images, labels = load_split(out, split)
        result += [(img.numpy().tobytes(), int(lab)) for img, lab in zip(images, labels, strict=True)]
    return sorted(result)


def _expected(images: list[np.ndarray], labels: list[int]) -> list[tuple[bytes, int]]:
    pairs = zip(images, labels, strict=True)
    return sorted((np.ascontiguousarray(img, dtype=np.uint8).tobytes(), lab) for img, lab in pairs)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare_dataset(DataParams(), out)
    return out


def test_digits_reference_split_and_manifest_matches_shards(digits):
    manifest = read_manifest(digits)
    assert manifest.splits == {"train": 1000, "val": 350, "test": 447}
    assert manifest.image_shape == (1, 8, 8) and manifest.num_levels == 17 and manifest.channels == 1
    assert manifest.class_names == [str(d) for d in range(10)]
    assert manifest.skipped == [] and manifest.source["source"] == "digits"
    listed = set()
    for split, shards in manifest.shards.items():
        for shard in shards:
            path = digits / shard["name"]
            listed.add(path.name)
            assert shard["sha256"] == sha256_file(path) and shard["size"] == path.stat().st_size
            with tarfile.open(path) as tar:
                names = tar.getnames()
            assert sum(n.endswith(".npy") for n in names) == shard["count"]
            assert all(n.count(".") == 1 for n in names)  # keys have no dots
        assert sum(s["count"] for s in shards) == manifest.splits[split]
    assert {p.name for p in digits.glob("*.tar")} == listed
    assert manifest_hash(digits) == sha256_file(digits / "manifest.json")


def test_digits_round_trip_every_pixel_and_label(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    bounds = {"train": (0, 1000), "val": (1000, 1350), "test": (1350, 1797)}
    for split, (lo, hi) in bounds.items():
        images, labels = load_split(digits, split)
        assert images.dtype == torch.uint8 and images.shape == (hi - lo, 1, 8, 8)
        np.testing.assert_array_equal(images[:, 0].numpy(), ref.images[lo:hi].astype(np.uint8))
        np.testing.assert_array_equal(labels.numpy(), ref.target[lo:hi])


def _assert_same_files(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert sha256_file(a / name) == sha256_file(b / name), name


def test_shards_and_manifest_are_byte_identical_across_runs(tmp_path, digits):
    prepare_dataset(DataParams(), tmp_path / "again")
    _assert_same_files(digits, tmp_path / "again")
    rng = np.random.default_rng(0)
    for i in range(7):
        _save(tmp_path / "in" / f"{i}.png", rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    params = DataParams(source="folder", path=str(tmp_path / "in"), image_size=5, samples_per_shard=2)
    prepare_dataset(params, tmp_path / "f1")
    prepare_dataset(params, tmp_path / "f2")
    _assert_same_files(tmp_path / "f1", tmp_path / "f2")


def test_folder_with_class_subfolders_gray_and_rgb(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = [], []
    for label, cls in enumerate(["ant", "bee"]):
        for i in range(6):
            if i % 2:
                rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
                _save(tmp_path / "in" / cls / f"{i}.png", rgb)
                images.append(rgb.transpose(2, 0, 1))
            else:
                gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
                _save(tmp_path / "in" / cls / f"{i}.png", gray)
                images.append(np.repeat(gray[None], 3, axis=0))
            labels.append(label)
    (tmp_path / "in" / "bee" / "notes.txt").write_text("not an image")
    params = DataParams(source="folder", path=str(tmp_path / "in"), val_fraction=0.25, test_fraction=0.25)
    manifest = prepare_dataset(params, tmp_path / "out")
    assert manifest.splits == {"train": 6, "val": 3, "test": 3}
    assert manifest.image_shape == (3, 5, 7) and manifest.num_levels == 256
    assert manifest.class_names == ["ant", "bee"]
    assert _all_samples(tmp_path / "out") == _expected(images, labels)


def test_folder_grayscale_channels_and_flat_layout(tmp_path):
    rng = np.random.default_rng(2)
    rgbs = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(5)]
    for i, rgb in enumerate(rgbs):
        _save(tmp_path / "in" / f"img{i}.jpg" if i == 0 else tmp_path / "in" / f"img{i}.png", rgb)
    params = DataParams(source="folder", path=str(tmp_path / "in"), channels=1, val_fraction=0.2, test_fraction=0.2)
    manifest = prepare_dataset(params, tmp_path / "out")
    assert manifest.image_shape == (1, 4, 4) and manifest.class_names is None
    expected = [np.asarray(Image.open(p).convert("L"))[None] for p in sorted((tmp_path / "in").iterdir())]
    assert _all_samples(tmp_path / "out") == _expected(expected, [-1] * 5)


def test_folder_resize_shorter_side_and_center_crop(tmp_path):
    wide = np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1))  # 4 high, 8 wide: only cropped
    _save(tmp_path / "in" / "a_wide.png", wide)
    _save(tmp_path / "in" / "b_big.png", np.full((12, 16), 77, dtype=np.uint8))  # resized to 4x5, cropped
    params = DataParams(source="folder", path=str(tmp_path / "in"), image_size=4, val_fraction=0, test_fraction=0)
    prepare_dataset(params, tmp_path / "out")
    images, _ = load_split(tmp_path / "out", "train")
    assert images.shape == (2, 1, 4, 4)
    got = sorted(images.numpy().tolist())
    assert got == sorted([wide[None, :, 2:6].tolist(), np.full((1, 4, 4), 77).tolist()])


@pytest.mark.parametrize("layout", ["npz", "npy_rgb", "npy_gray"])
def test_array_round_trip(tmp_path, layout):
    rng = np.random.default_rng(3)
    if layout == "npy_gray":
        data, labels = rng.integers(0, 256, (20, 6, 5), dtype=np.uint8), None
        np.save(tmp_path / "a.npy", data)
        expected = [img[None] for img in data]
    elif layout == "npy_rgb":
        data, labels = rng.integers(0, 256, (20, 6, 5, 3), dtype=np.uint8), None
        np.save(tmp_path / "a.npy", data)
        expected = [img.transpose(2, 0, 1) for img in data]
    else:
        data, labels = rng.integers(0, 256, (20, 6, 5), dtype=np.uint8), rng.integers(0, 4, 20)
        np.savez(tmp_path / "a.npz", images=data, labels=labels)
        expected = [img[None] for img in data]
    path = tmp_path / ("a.npz" if layout == "npz" else "a.npy")
    params = DataParams(source="array", path=str(path), samples_per_shard=4, seed=7)
    manifest = prepare_dataset(params, tmp_path / "out")
    assert manifest.splits == {"train": 16, "val": 2, "test": 2}
    assert [s["count"] for s in manifest.shards["train"]] == [4, 4, 4, 4]
    labels = [-1] * 20 if labels is None else labels.tolist()
    assert _all_samples(tmp_path / "out") == _expected(expected, labels)


def test_prepare_replaces_output_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "stale.tar").write_bytes(b"old")
    prepare_dataset(DataParams(), out)
    assert not (out / "stale.tar").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_failed_prepare_keeps_previous_output(tmp_path):
    out = tmp_path / "shards"
    prepare_dataset(DataParams(), out)
    before = sha256_file(out / "manifest.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        prepare_dataset(DataParams(source="folder", path=str(tmp_path / "empty")), out)
    assert sha256_file(out / "manifest.json") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "shards"]


def test_pipeline_prepare_reads_data_section(tmp_path, monkeypatch, capsys):
    data = np.zeros((10, 3, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", data)
    params = {"data": {"source": "array", "path": "x.npy", "out_dir": "out"}, "train": {"lr": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    prepare_main(["--params", "params.yaml"])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "train=8 val=1 test=1" in line
    assert read_manifest(tmp_path / "out").source["path"] == "x.npy"


def test_load_data_section_defaults_and_errors(tmp_path):
    (tmp_path / "p.yaml").write_text("train: {}\n")
    assert load_section(tmp_path / "p.yaml", "data", DataParams) == DataParams()
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_section(tmp_path / "missing.yaml", "data", DataParams)
    (tmp_path / "q.yaml").write_text("data:\n  sorce: digits\n")
    with pytest.raises(ValueError, match=r"unknown params key data\.sorce"):
        load_section(tmp_path / "q.yaml", "data", DataParams)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"source": "mnist"}, "data.source"),
        ({"path": "x"}, "data.path is not used by source 'digits'"),
        ({"source": "folder"}, "data.path must name"),
        ({"source": "array", "path": "a.npy", "image_size": 8}, "data.image_size is only used"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ data.test_fraction"),
        ({"source": "folder", "path": "d", "channels": 2}, "data.channels"),
        ({"samples_per_shard": 0}, "data.samples_per_shard"),
        ({"skip_bad": "yes"}, "data.skip_bad"),
    ],
)
def test_invalid_params_are_named(fields, match):
    with pytest.raises(DataError, match=match):
        DataParams(**fields)
