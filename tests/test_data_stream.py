"""The training stream: independent of the number of workers, resumable at any batch position,
array-decoded shards equal to member-by-member decoding, and shards plain webdataset still reads."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from ddgm.data import (
    DataError,
    DataParams,
    TrainLoader,
    load_split,
    prepare_dataset,
    read_manifest,
    shard_urls,
)
from ddgm.data.shards import _decode_members, _npy_header, encode_sample
from ddgm.data.tar_layout import decode_regular
from ddgm.data.train_stream import levels_to_unit_array
from ddgm.data.verification import sha256_file
from ddgm.quantization import levels_to_unit


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare_dataset(DataParams(), out)
    return out


def _take(loader: TrainLoader, count: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(loader.batches(start), count))


def _same(a: list, b: list) -> bool:
    pairs = zip(a, b, strict=True)
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in pairs)


@pytest.mark.timeout(60)
def test_stream_does_not_depend_on_the_number_of_workers(digits):
    # batch 48 does not divide the windows (1000-sample windows of 8 shards), 40 batches span several
    streams = [_take(TrainLoader(digits, batch_size=48, num_workers=n, seed=5), 40) for n in (0, 1, 2)]
    assert _same(streams[0], streams[1]) and _same(streams[0], streams[2])
    assert all(len(x) == 48 for x, _ in streams[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("shuffle_buffer", "workers"), [(1000, 0), (1000, 2), (0, 0), (300, 0)])
def test_resume_at_any_batch_position_is_bit_exact(digits, shuffle_buffer, workers):
    loader = TrainLoader(digits, batch_size=48, rank=1, world_size=2, seed=2, shuffle_buffer=shuffle_buffer,
                         num_workers=workers)
    whole = _take(loader, 45)
    for start in (1, 20, 21, 44):
        assert _same(_take(loader, 45 - start, start), whole[start:]), start


def test_epochs_are_slices_of_the_stream(digits):
    loader = TrainLoader(digits, batch_size=32, seed=1)
    stream = _take(loader, 3 * loader.batches_per_epoch)
    for e in range(3):
        per_epoch = loader.batches_per_epoch
        assert _same(list(loader.epoch(e)), stream[e * per_epoch:(e + 1) * per_epoch])


def test_a_shuffled_epoch_draws_from_every_shard(digits):
    loader = TrainLoader(digits, batch_size=100, seed=0, shuffle_buffer=1000)
    first = torch.cat([x for x, _ in islice(loader.batches(), 10)])
    train, _ = load_split(digits, "train")
    index = {img.numpy().tobytes(): i for i, img in enumerate(levels_to_unit(train, 17))}
    positions = torch.tensor([index[img.numpy().tobytes()] for img in first])
    assert len(set((positions // 128).tolist())) == 8  # all 8 train shards in the first batches
    assert not torch.equal(positions[:100], positions[:100].sort().values)  # and shuffled


@pytest.mark.parametrize("num_levels", [2, 17, 255, 256])
def test_numpy_level_conversion_equals_levels_to_unit(num_levels):
    levels = np.arange(num_levels, dtype=np.uint8)
    expected = levels_to_unit(torch.from_numpy(levels), num_levels).numpy()
    assert np.array_equal(levels_to_unit_array(levels, num_levels), expected)


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 5, 7), (3, 32, 32)])
def test_array_decoding_equals_member_decoding(tmp_path, image_shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, *image_shape), dtype=np.uint8)
    labels = rng.integers(-1, 1000, 300)
    prepare_dataset(DataParams(source="array", path=str(_save_array(tmp_path, images, labels)),
                               val_fraction=0, test_fraction=0), tmp_path / "out")
    for url in shard_urls(tmp_path / "out", "train"):
        data = Path(url).read_bytes()
        count = len(_decode_members(url, data, image_shape, 256)[1])
        fast = decode_regular(data, count, image_shape, 256, _npy_header(image_shape))
        slow = _decode_members(url, data, image_shape, 256)
        assert fast is not None
        assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])


def _save_array(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    path = tmp_path / "a.npz"
    channels_last = images.transpose(0, 2, 3, 1)
    np.savez(path, images=channels_last[..., 0] if images.shape[1] == 1 else channels_last, labels=labels)
    return path


def _rewrite_shard(dataset: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Replace a shard by a tar of ``members`` and update its manifest entry (sha256, size)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (dataset / name).write_bytes(buffer.getvalue())
    record = json.loads((dataset / "manifest.json").read_text())
    for entry in (e for entries in record["shards"].values() for e in entries if e["name"] == name):
        entry["sha256"], entry["size"] = sha256_file(dataset / name), len(buffer.getvalue())
    (dataset / "manifest.json").write_text(json.dumps(record))


def test_shards_in_another_layout_are_read_member_by_member(digits, tmp_path):
    dataset = Path(shutil.copytree(digits, tmp_path / "shards"))
    images, labels = load_split(digits, "test")
    members = []
    for i in range(128):  # .npy before .cls, long keys: not the regular layout
        sample = encode_sample(i, images[i].numpy(), int(labels[i]))
        members += [(f"sample_{i:090d}.npy", sample["npy"]), (f"sample_{i:090d}.cls", sample["cls"])]
    _rewrite_shard(dataset, "test-000000.tar", members)
    got_images, got_labels = load_split(dataset, "test")
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


def test_a_changed_pixel_is_caught_while_read(digits, tmp_path):
    dataset = Path(shutil.copytree(digits, tmp_path / "shards"))
    shard = dataset / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[2048 + 1024 + 512 + 128 + 10] ^= 1  # pixel 10 of sample 1: the tar stays well-formed
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard .*train-000003\.tar has sha256 .*the manifest lists"):
        load_split(dataset, "train")
    with pytest.raises(DataError, match=r"shard .*train-000003\.tar has sha256"):
        list(islice(TrainLoader(dataset, batch_size=64, shuffle_buffer=0, num_workers=0).batches(), 20))


def test_plain_webdataset_reads_the_shards(digits):
    images, labels = load_split(digits, "val")
    samples = list(wds.WebDataset(shard_urls(digits, "val"), shardshuffle=False).decode())
    assert len(samples) == read_manifest(digits).splits["val"] == len(images)
    assert all(np.array_equal(s["npy"], img.numpy()) and s["cls"] == int(label)
               for s, img, label in zip(samples, images, labels, strict=True))
