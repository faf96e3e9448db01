"""Loaders over prepared shards: fixed-length deterministic training epochs, exact eval passes,
remote-style locations, and corrupt shards failing loudly (never hanging)."""

from __future__ import annotations

import functools
import shutil
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ddgm.data import (
    DataError,
    EvalLoader,
    TrainLoader,
    eval_batches,
    load_split,
    manifest_hash,
    read_manifest,
    shard_urls,
    verify_shards,
)
from ddgm.quantization import unit_to_levels

K = 17  # digits levels


@pytest.fixture
def digits(digits_shards) -> Path:
    """The session's digits shards (conftest), read only here; tests that change them use digits_copy."""
    return digits_shards


@pytest.fixture
def digits_copy(digits, tmp_path) -> Path:
    return Path(shutil.copytree(digits, tmp_path / "shards"))


def _keys(images: torch.Tensor) -> list[bytes]:
    """Pixel content of float images as hashable keys."""
    return [img.numpy().tobytes() for img in unit_to_levels(images, K)]


def _epoch(loader: TrainLoader, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(e))


def test_two_ranks_two_workers_get_equal_full_batches(digits):
    loaders = [TrainLoader(digits, batch_size=32, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert all(loader.batches_per_epoch == 16 for loader in loaders)  # ceil(1000 / (32 * 2))
    per_rank = [_epoch(loader, 0) for loader in loaders]
    for batches in per_rank:
        assert len(batches) == 16
        for images, labels in batches:
            assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
            assert labels.shape == (32,) and labels.dtype == torch.int64
            assert images.min() >= -1 and images.max() <= 1
            assert labels.min() >= 0  # digits are labelled
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])
    assert loaders[0].image_shape == (1, 8, 8) and loaders[0].num_levels == K


def test_epochs_are_deterministic_and_differ(digits):
    loader = TrainLoader(digits, batch_size=50, num_workers=1, seed=3, shuffle_buffer=200)
    first, again = _epoch(loader, 2), _epoch(TrainLoader(digits, batch_size=50, num_workers=1, seed=3,
                                                         shuffle_buffer=200), 2)
    assert len(first) == 20
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], _epoch(loader, 3)[0][0])
    other_seed = TrainLoader(digits, batch_size=50, num_workers=1, seed=4, shuffle_buffer=200)
    assert not torch.equal(first[0][0], _epoch(other_seed, 2)[0][0])


def test_without_shuffle_buffer_an_epoch_covers_every_sample(digits):
    seen = []
    for rank in range(2):
        loader = TrainLoader(digits, batch_size=32, rank=rank, world_size=2, num_workers=2, shuffle_buffer=0)
        seen += [key for images, _ in loader.epoch(0) for key in _keys(images)]
    train, _ = load_split(digits, "train")
    assert len(seen) == 1024 and set(seen) == {img.numpy().tobytes() for img in train}


@pytest.mark.parametrize(("batches", "workers"), [(5, 2), (1, 2), (7, 0)])
def test_explicit_epoch_length(digits, batches, workers):
    loader = TrainLoader(digits, batch_size=16, num_workers=workers, batches_per_epoch=batches)
    assert [len(images) for images, _ in loader.epoch(0)] == [16] * batches


def test_few_shards_many_streams_and_big_batches(digits):
    # 3 val shards, 4 ranks x 2 workers: every worker still gets data; batches larger than a shard
    for rank in range(4):
        loader = TrainLoader(digits, "val", batch_size=200, rank=rank, world_size=4, num_workers=2)
        assert [len(images) for images, _ in loader.epoch(0)] == [200]  # ceil(350 / 800) = 1


def test_train_loader_leaves_global_rng_alone(digits):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(TrainLoader(digits, batch_size=64, num_workers=1), 0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_eval_pass_sees_every_sample_exactly_once(digits, world_size):
    test_images, test_labels = load_split(digits, "test")
    seen = Counter()
    sizes = []
    for rank in range(world_size):
        loader = EvalLoader(digits, "test", batch_size=40, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        sizes.append(sum(len(images) for images, _ in batches))
        assert sizes[-1] == loader.num_samples
        for images, labels in batches:
            seen.update(zip(_keys(images), labels.tolist(), strict=True))
    expected = Counter(zip((img.numpy().tobytes() for img in test_images), test_labels.tolist(), strict=True))
    assert seen == expected and sum(sizes) == 447
    assert max(sizes) - min(sizes) <= 1


def test_eval_batches_order_matches_load_split(digits):
    images, labels = load_split(digits, "val")
    batches = list(eval_batches(digits, "val", batch_size=100))
    assert [len(b[1]) for b in batches] == [100, 100, 100, 50]
    assert torch.equal(torch.cat([unit_to_levels(b[0], K) for b in batches]), images)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)


def test_file_and_pipe_locations(digits):
    images, labels = load_split(digits, "test")
    for location in (digits.as_uri(), f"pipe:cat {digits}/{{name}}"):
        got_images, got_labels = load_split(location, "test")
        assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
        assert manifest_hash(location) == manifest_hash(digits)
        loader = TrainLoader(location, batch_size=64, num_workers=1)
        assert len(_epoch(loader, 0)) == 16
    assert shard_urls(f"pipe:cat {digits}/{{name}}", "val")[0] == f"pipe:cat {digits}/val-000000.tar"
    with pytest.raises(DataError, match=r"must contain '\{name\}'"):
        read_manifest(f"pipe:cat {digits}/manifest.json")


@pytest.mark.timeout(60)
def test_http_location(digits):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(digits))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        images, labels = load_split(url, "val")
        assert torch.equal(images, load_split(digits, "val")[0]) and len(labels) == 350
        assert manifest_hash(url) == manifest_hash(digits)
    finally:
        server.shutdown()
        server.server_close()


def test_manifest_errors_name_the_file(tmp_path, digits, digits_copy):
    with pytest.raises(FileNotFoundError, match=r"manifest not found: .*nowhere/manifest\.json"):
        read_manifest(tmp_path / "nowhere")
    assert read_manifest(digits / "manifest.json").splits["test"] == 447
    with pytest.raises(DataError, match="has no split 'dev'"):
        shard_urls(digits, "dev")
    (digits_copy / "manifest.json").write_text('{"splits": {"train": 3}')
    with pytest.raises(DataError, match=r"manifest .*shards/manifest\.json is corrupt"):
        read_manifest(digits_copy)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


CORRUPTIONS = {
    "mid_member": lambda p: _truncate(p, 10 * 2048 + 700),  # cut inside a file's data
    "member_boundary": lambda p: _truncate(p, 10 * 2048),  # tar reader sees a clean end: count check
    "garbage": lambda p: p.write_bytes(b"\x07" * 3000),
    "empty": lambda p: p.write_bytes(b""),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kind", "workers"),
    # torch takes ~5 s to shut a DataLoader down after a worker error: test that path once
    [(kind, 0) for kind in sorted(CORRUPTIONS)] + [("member_boundary", 1)],
)
def test_corrupt_train_shard_names_the_shard(digits_copy, kind, workers):
    for shard in digits_copy.glob("train-*.tar"):
        CORRUPTIONS[kind](shard)
    loader = TrainLoader(digits_copy, batch_size=32, num_workers=workers, shuffle_buffer=10)
    with pytest.raises((DataError, FileNotFoundError), match=r"shard .*train-00000\d\.tar"):
        _epoch(loader, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["mid_member", "member_boundary", "garbage"])
def test_corrupt_eval_shard_names_the_shard(digits_copy, kind):
    CORRUPTIONS[kind](digits_copy / "test-000001.tar")
    with pytest.raises(DataError, match=r"shard .*test-000001\.tar"):
        list(eval_batches(digits_copy, "test", batch_size=64))
    with pytest.raises(DataError, match=r"shard .*test-000001\.tar"):
        load_split(digits_copy, "test")


def test_verify_shards(digits_copy):
    assert verify_shards(digits_copy).splits["train"] == 1000
    shard = digits_copy / "val-000002.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 1
    shard.write_bytes(bytes(data))
    verify_shards(digits_copy, ["train", "test"])
    with pytest.raises(DataError, match=r"shard .*val-000002\.tar has sha256"):
        verify_shards(digits_copy)
    _truncate(shard, 1024)
    with pytest.raises(DataError, match=r"shard .*val-000002\.tar has 1024 bytes"):
        verify_shards(digits_copy, ["val"])
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*val-000002\.tar"):
        verify_shards(digits_copy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": 8, "rank": 2, "world_size": 2}, "rank must be < world_size=2"),
        ({"batch_size": 8, "num_workers": -1}, "num_workers"),
        ({"batch_size": 8, "batches_per_epoch": 0}, "batches_per_epoch"),
    ],
)
def test_train_loader_argument_errors(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainLoader(digits, **kwargs)
