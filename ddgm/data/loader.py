"""Reading prepared shards: the training stream, exact evaluation passes, and whole small splits.

``shards`` is a dataset location (see :mod:`ddgm.data.location`): a local directory holding
manifest.json and the shards, a ``file://`` or remote URL prefix of it, or a ``pipe:`` command
with ``{name}``. Pixels come out as float32 in [-1, 1] (``levels_to_unit``) or as uint8 levels.
Every shard is read whole and checked against the manifest's sha256 before it is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ddgm.data.errors import DataError
from ddgm.data.manifest import Manifest, read_manifest, shard_urls
from ddgm.data.shards import read_shard
from ddgm.data.train_stream import WindowPlan, WindowStream, keep, levels_to_unit_array


@dataclass(frozen=True)
class _Split:
    """A split's shard URLs and manifest entries, with the dataset's image format."""

    urls: list[str]
    entries: list[dict]
    image_shape: tuple[int, int, int]
    num_levels: int

    @property
    def counts(self) -> list[int]:
        return [int(entry["count"]) for entry in self.entries]


def _open_split(shards: str | Path, split: str) -> tuple[Manifest, _Split]:
    manifest = read_manifest(shards)
    urls = shard_urls(shards, split, manifest)
    return manifest, _Split(urls, manifest.shards[split], manifest.image_shape, manifest.num_levels)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, found {value!r}")


Block = tuple[np.ndarray, np.ndarray]  # (uint8 levels [n, C, H, W], int64 labels [n])


def _as_batch(levels: np.ndarray, labels: np.ndarray, num_levels: int) -> tuple[Tensor, Tensor]:
    """A batch as the loaders give it: (float32 images in [-1, 1], int64 labels), both newly allocated."""
    return torch.from_numpy(levels_to_unit_array(levels, num_levels)), torch.from_numpy(labels.copy())


def _rebatch(blocks: Iterable[Block], batch_size: int, partial: bool) -> Iterator[Block]:
    """Consecutive batches of ``batch_size`` samples over blocks of any size (the last one short if
    ``partial``). Batches inside a block are views of it; only a batch that spans blocks is copied."""
    carry: list[Block] = []
    carried = 0
    for levels, labels in blocks:
        start = 0
        if carried:
            start = min(batch_size - carried, len(labels))
            carry.append((levels[:start], labels[:start]))
            carried += start
            if carried < batch_size:
                continue
            yield np.concatenate([c[0] for c in carry]), np.concatenate([c[1] for c in carry])
            carry, carried = [], 0
        full = start + (len(labels) - start) // batch_size * batch_size
        for lo in range(start, full, batch_size):
            yield levels[lo:lo + batch_size], labels[lo:lo + batch_size]
        if full < len(labels):
            carry, carried = [(levels[full:], labels[full:])], len(labels) - full
    if partial and carried:
        yield np.concatenate([c[0] for c in carry]), np.concatenate([c[1] for c in carry])


def _in_order(windows: Iterable[tuple[int, np.ndarray, np.ndarray]], first: int, skip: int) -> Iterator[Block]:
    """Windows' (levels, labels) from window ``first`` on, checked to arrive in order; the first
    ``skip`` samples of window ``first`` are dropped."""
    expected = first
    for index, levels, labels in windows:
        if index != expected:
            raise RuntimeError(f"training window {index} arrived where window {expected} was expected")
        drop = skip if index == first else 0
        expected += 1
        yield levels[drop:], labels[drop:]


class TrainLoader:
    """Training loader: one endless, deterministic stream of full batches on every rank.

    ``batches(start)`` yields the rank's batches from batch position ``start`` on; batch b is
    determined by (seed, rank, world_size, batch_size, shuffle_buffer) alone, not by the number of
    workers, and is the same whether the stream starts at 0 or at b, so a run resumes bit-exactly at
    its position. Samples are shuffled within windows of whole shards that hold ``shuffle_buffer``
    samples on average (see :mod:`ddgm.data.train_stream`); each DataLoader worker builds whole
    windows, started once per stream. ``epoch(e)`` is batches [e * batches_per_epoch, (e + 1) *
    batches_per_epoch); the default epoch length is ceil(N / (batch_size * world_size)): one pass
    over the N samples across all ranks. Pass the rank and world size explicitly; do not hand this
    loader to ``accelerate.prepare``.
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
        counts = self._split.counts
        per_window = 1 if shuffle_buffer <= 1 else math.ceil(shuffle_buffer * len(counts) / self.num_samples)
        self._plan = WindowPlan(tuple(counts), rank, world_size, seed, min(per_window, len(counts)))

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

    def batches(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless batches from batch position ``start``: (images float32 [B, C, H, W] in [-1, 1],
        labels int64 [B], -1 = none). Workers, if any, live as long as the iterator."""
        _check_int("start", start, 0)
        first, skip = self._plan.locate(start * self.batch_size)
        split = self._split
        stream = WindowStream(self._plan, split.urls, split.entries, split.image_shape, split.num_levels,
                              shuffle=self.shuffle_buffer > 1, first=first)
        windows: Iterable[tuple[int, np.ndarray, np.ndarray]] = stream
        if self.num_workers > 0:
            # An own generator keeps the DataLoader from drawing on the global torch RNG.
            generator = torch.Generator().manual_seed(self.seed)
            windows = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=generator,
                                 collate_fn=keep)
        for levels, labels in _rebatch(_in_order(windows, first, skip), self.batch_size, partial=False):
            yield _as_batch(levels, labels, self.num_levels)

    def epoch(self, e: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The ``batches_per_epoch`` batches of epoch ``e`` (see :meth:`batches`)."""
        _check_int("epoch", e, 0)
        return islice(self.batches(e * self._batches_per_epoch), self._batches_per_epoch)


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

    def _blocks(self) -> Iterator[Block]:
        offset = 0
        split = self._split
        for url, entry in zip(split.urls, split.entries, strict=True):
            count = int(entry["count"])
            lo, hi = max(self.start - offset, 0), min(self.stop - offset, count)
            if lo < hi:
                levels, labels = read_shard(url, entry, split.image_shape, split.num_levels)
                yield levels[lo:hi], labels[lo:hi]
            offset += count

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for levels, labels in _rebatch(self._blocks(), self.batch_size, partial=True):
            yield _as_batch(levels, labels, self.num_levels)


def eval_batches(shards: str | Path, split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate an :class:`EvalLoader`: every sample of the split exactly once across the ranks."""
    return iter(EvalLoader(shards, split, batch_size, rank, world_size))


def load_split(shards: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """A whole split in memory: (uint8 levels [N, C, H, W], int64 labels [N]) in stored order."""
    _, data = _open_split(shards, split)
    blocks = [read_shard(url, entry, data.image_shape, data.num_levels)
              for url, entry in zip(data.urls, data.entries, strict=True)]
    if not blocks:
        return torch.empty((0, *data.image_shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images = np.concatenate([block[0] for block in blocks])
    labels = np.concatenate([block[1] for block in blocks])
    return torch.from_numpy(images), torch.from_numpy(labels)
