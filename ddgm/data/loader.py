"""Reading prepared shards: the training stream, exact evaluation passes, and whole small splits.

``shards`` is a dataset location (see :mod:`ddgm.data.location`): a local directory holding
manifest.json and the shards, a ``file://`` or remote URL prefix of it, or a ``pipe:`` command
with ``{name}``. Pixels come out as float32 in [-1, 1] (``levels_to_unit``) or as uint8 levels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddgm.data.errors import DataError
from ddgm.data.manifest import Manifest, read_manifest, shard_urls
from ddgm.data.shards import read_shard, read_shards
from ddgm.quantization import levels_to_unit


@dataclass(frozen=True)
class _Split:
    """A split's shard URLs and sample counts, with the dataset's image format."""

    urls: list[str]
    counts: list[int]
    image_shape: tuple[int, int, int]
    num_levels: int


def _open_split(shards: str | Path, split: str) -> tuple[Manifest, _Split]:
    manifest = read_manifest(shards)
    urls = shard_urls(shards, split, manifest)
    counts = [int(entry["count"]) for entry in manifest.shards[split]]
    return manifest, _Split(urls, counts, manifest.image_shape, manifest.num_levels)


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[Tensor, Tensor]:
    levels = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return levels, labels


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, found {value!r}")


class _TrainStream(IterableDataset):
    """One rank's batches (uint8 levels, labels) for one epoch, split over DataLoader workers.

    Shards are visited in an endless sequence of seeded permutations (the same on every rank);
    rank r, worker w of W ranks x N workers takes positions r + W*w, r + W*w + W*N, ... of it
    (node splitting, then worker splitting). So every worker always has data, however few
    shards there are, and all ranks together read the shards about evenly. Each worker shuffles
    through a seeded buffer and yields exactly its share of full batches.
    """

    def __init__(self, split: _Split, *, batch_size: int, num_batches: int, rank: int, world_size: int,
                 seed: int, epoch: int, shuffle_buffer: int) -> None:
        super().__init__()
        self.split, self.batch_size, self.num_batches = split, batch_size, num_batches
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle_buffer = shuffle_buffer

    def _shard_cycle(self) -> Iterator[int]:
        rng = random.Random(f"shards/{self.seed}/{self.epoch}")
        order = list(range(len(self.split.urls)))
        while True:
            rng.shuffle(order)
            yield from order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        share = self.num_batches // num_workers + (worker < self.num_batches % num_workers)
        if share == 0:
            return
        streams = self.world_size * num_workers
        mine = islice(self._shard_cycle(), self.rank + self.world_size * worker, None, streams)
        split = self.split
        samples = (
            sample
            for index in mine
            for sample in read_shard(split.urls[index], split.counts[index], split.image_shape, split.num_levels)
        )
        if self.shuffle_buffer > 1:
            rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{self.world_size}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, rng=rng)(samples)
        batches = wds.batched(self.batch_size, collation_fn=_collate, partial=False)(samples)
        yield from islice(batches, share)


class TrainLoader:
    """Training loader: fixed-length, deterministic epochs of full batches on every rank.

    ``epoch(e)`` yields exactly ``batches_per_epoch`` batches of ``batch_size`` (per rank) on
    every rank, determined by (seed, e, rank, world_size, num_workers) alone, so a run can
    resume bit-exactly by replaying an epoch and skipping batches. The default epoch length is
    ceil(N / (batch_size * world_size)): one pass over the N samples across all ranks. Pass the
    rank and world size explicitly; do not hand this loader to ``accelerate.prepare``.
    """

    def __init__(self, shards: str | Path, split: str = "train", *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000,
                 batches_per_epoch: int | None = None) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, found {rank}")
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        if batches_per_epoch is not None:
            _check_int("batches_per_epoch", batches_per_epoch, 1)
        self.manifest, self._split = _open_split(shards, split)
        self.num_samples = self.manifest.splits[split]
        if self.num_samples == 0:
            raise DataError(f"split {split!r} of dataset {shards} is empty; expected training samples")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self._batches_per_epoch = batches_per_epoch or math.ceil(self.num_samples / (batch_size * world_size))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest.image_shape

    @property
    def num_levels(self) -> int:
        return self.manifest.num_levels

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.class_names

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def __len__(self) -> int:
        return self._batches_per_epoch

    def epoch(self, e: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of epoch ``e``: (images float32 [B, C, H, W] in [-1, 1], labels int64 [B], -1 = none)."""
        _check_int("epoch", e, 0)
        stream = _TrainStream(
            self._split, batch_size=self.batch_size, num_batches=self._batches_per_epoch, rank=self.rank,
            world_size=self.world_size, seed=self.seed, epoch=e, shuffle_buffer=self.shuffle_buffer,
        )
        batches = stream
        if self.num_workers > 0:
            # An own generator keeps the DataLoader from drawing on the global torch RNG.
            generator = torch.Generator().manual_seed(self.seed)
            batches = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=generator)
        for levels, labels in batches:
            yield levels_to_unit(levels, self.num_levels), labels


class EvalLoader:
    """One exact pass over a split: rank r of W gets the contiguous block of samples
    [N*r//W, N*(r+1)//W) in stored order, so all ranks together see every sample exactly once.
    Batches are (images float32 in [-1, 1], labels int64); the last one may be short."""

    def __init__(self, shards: str | Path, split: str, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, found {rank}")
        self.manifest, self._split = _open_split(shards, split)
        total = self.manifest.splits[split]
        self.start, self.stop = total * rank // world_size, total * (rank + 1) // world_size
        self.batch_size = batch_size

    @property
    def num_samples(self) -> int:
        """Samples this rank sees."""
        return self.stop - self.start

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest.image_shape

    @property
    def num_levels(self) -> int:
        return self.manifest.num_levels

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _samples(self) -> Iterator[tuple[np.ndarray, int]]:
        offset = 0
        split = self._split
        for url, count in zip(split.urls, split.counts, strict=True):
            lo, hi = max(self.start - offset, 0), min(self.stop - offset, count)
            if lo < hi:  # read the whole shard so its sample count is checked
                for i, sample in enumerate(read_shard(url, count, split.image_shape, split.num_levels)):
                    if lo <= i < hi:
                        yield sample
            offset += count

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for levels, labels in wds.batched(self.batch_size, collation_fn=_collate, partial=True)(self._samples()):
            yield levels_to_unit(levels, self.num_levels), labels


def eval_batches(shards: str | Path, split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate an :class:`EvalLoader`: every sample of the split exactly once across the ranks."""
    return iter(EvalLoader(shards, split, batch_size, rank, world_size))


def load_split(shards: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """A whole split in memory: (uint8 levels [N, C, H, W], int64 labels [N]) in stored order."""
    manifest, data = _open_split(shards, split)
    samples = list(read_shards(data.urls, data.counts, data.image_shape, data.num_levels))
    if not samples:
        return torch.empty((0, *data.image_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return _collate(samples)
