"""Bad inputs to the prepare stage: each gives a clear error naming the file and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddgm.data import DataError, DataParams, load_split, prepare_dataset, read_manifest


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _folder(path: Path, **kw) -> DataParams:
    return DataParams(source="folder", path=str(path), val_fraction=0, test_fraction=0, **kw)


def _array(path: Path) -> DataParams:
    return DataParams(source="array", path=str(path))


@pytest.fixture
def folder_with_bad_files(tmp_path) -> Path:
    root = tmp_path / "in"
    for i in range(4):
        _save(root / "cls" / f"ok{i}.png", np.full((4, 4), i * 10, dtype=np.uint8))
    (root / "cls" / "garbage.png").write_bytes(b"this is not a png")
    good = (root / "cls" / "ok0.png").read_bytes()
    (root / "cls" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_corrupt_image_is_named(folder_with_bad_files, tmp_path):
    with pytest.raises(DataError, match=r"cannot read image .*garbage\.png"):
        prepare_dataset(_folder(folder_with_bad_files), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_image_is_named(folder_with_bad_files, tmp_path):
    (folder_with_bad_files / "cls" / "garbage.png").unlink()
    with pytest.raises(DataError, match=r"cannot read image .*truncated\.png"):
        prepare_dataset(_folder(folder_with_bad_files), tmp_path / "out")


def test_skip_bad_warns_skips_and_counts(folder_with_bad_files, tmp_path):
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        manifest = prepare_dataset(_folder(folder_with_bad_files, skip_bad=True), tmp_path / "out")
    assert len(record) == 2
    assert manifest.skipped == ["cls/garbage.png", "cls/truncated.png"]
    assert manifest.splits["train"] == 4
    on_disk = read_manifest(tmp_path / "out")
    assert on_disk.skipped == manifest.skipped
    assert '"num_skipped": 2' in (tmp_path / "out" / "manifest.json").read_text()
    images, _ = load_split(tmp_path / "out", "train")
    assert sorted(int(img[0, 0, 0]) for img in images) == [0, 10, 20, 30]


def test_all_images_bad_with_skip_bad(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="skipping unreadable image"), pytest.raises(
        DataError, match=r"no readable images .*all 1 image files"
    ):
        prepare_dataset(_folder(tmp_path / "in", skip_bad=True), tmp_path / "out")


def test_folder_without_images(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no images found in folder .*in: expected \.png"):
        prepare_dataset(_folder(tmp_path / "in"), tmp_path / "out")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nowhere"):
        prepare_dataset(_folder(tmp_path / "nowhere"), tmp_path / "out")


def test_empty_class_folder(tmp_path):
    _save(tmp_path / "in" / "a" / "x.png", np.zeros((3, 3), dtype=np.uint8))
    (tmp_path / "in" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*b holds no images"):
        prepare_dataset(_folder(tmp_path / "in"), tmp_path / "out")


def test_images_next_to_class_folders(tmp_path):
    _save(tmp_path / "in" / "a" / "x.png", np.zeros((3, 3), dtype=np.uint8))
    _save(tmp_path / "in" / "y.png", np.zeros((3, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="both images at the top level"):
        prepare_dataset(_folder(tmp_path / "in"), tmp_path / "out")


def test_mixed_image_sizes_without_image_size(tmp_path):
    _save(tmp_path / "in" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _save(tmp_path / "in" / "b.png", np.zeros((4, 6), dtype=np.uint8))
    with pytest.raises(DataError, match=r"different sizes: .*a\.png is 4x4 but .*b\.png is 6x4 .*data\.image_size"):
        prepare_dataset(_folder(tmp_path / "in"), tmp_path / "out")
    manifest = prepare_dataset(_folder(tmp_path / "in", image_size=3), tmp_path / "out")
    assert manifest.image_shape == (1, 3, 3)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((5, 4, 4), dtype=np.float64), "must have dtype uint8 .*found float64"),
        (np.zeros((5, 4), dtype=np.uint8), r"must have shape \(N, H, W\) or \(N, H, W, C\), found shape \(5, 4\)"),
        (np.zeros((2, 5, 4, 4, 1), dtype=np.uint8), r"found shape \(2, 5, 4, 4, 1\)"),
        (np.zeros((5, 4, 4, 2), dtype=np.uint8), "1 or 3 channels .*found shape"),
        (np.zeros((0, 4, 4), dtype=np.uint8), r"holds no images \(shape \(0, 4, 4\)\)"),
    ],
)
def test_bad_npy_arrays(tmp_path, array, match):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(DataError, match=match) as info:
        prepare_dataset(_array(tmp_path / "a.npy"), tmp_path / "out")
    assert "a.npy" in str(info.value)


def test_npz_without_images_key(tmp_path):
    np.savez(tmp_path / "a.npz", pixels=np.zeros((3, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"a\.npz has no array named 'images'; found keys \['pixels'\]"):
        prepare_dataset(_array(tmp_path / "a.npz"), tmp_path / "out")


def test_npz_with_mismatched_labels(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 2, 2), dtype=np.uint8), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"labels in .*a\.npz must be integers of shape \(3,\)"):
        prepare_dataset(_array(tmp_path / "a.npz"), tmp_path / "out")


def test_unreadable_or_missing_array_file(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read array file .*a\.npy"):
        prepare_dataset(_array(tmp_path / "a.npy"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"array file not found: .*b\.npy"):
        prepare_dataset(_array(tmp_path / "b.npy"), tmp_path / "out")
    (tmp_path / "c.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"must end in \.npy or \.npz, found '\.csv'"):
        prepare_dataset(_array(tmp_path / "c.csv"), tmp_path / "out")


def test_too_few_images_for_a_training_split(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2), dtype=np.uint8))
    params = DataParams(source="array", path=str(tmp_path / "a.npy"), val_fraction=0.5, test_fraction=0.4)
    with pytest.raises(DataError, match="2 images leave no training images"):
        prepare_dataset(params, tmp_path / "out")
