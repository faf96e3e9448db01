"""One rank's training stream: shards -> shuffled windows -> samples, addressable by position.

Shards are visited in an endless sequence of passes, each a seeded permutation of the split's shards
(the same on every rank). Rank r of W takes positions r, r + W, r + 2W, ... of that sequence, so every
rank always has data however few shards there are, and all ranks together read the shards evenly.
The rank's shards are grouped into windows of ``shards_per_window`` consecutive ones; the samples of a
window are permuted by a generator seeded with (seed, rank, W, window index), or kept in stored order
without shuffling. The rank's sample stream is its windows one after the other. A window is a
function of those numbers alone, so any window can be built on its own: DataLoader worker w of N
builds windows first + w, first + w + N, ... and the DataLoader hands them over in window order,
which makes the stream independent of the number of workers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ddgm.data.shards import read_shard
from ddgm.quantization import check_num_levels


def levels_to_unit_array(levels: np.ndarray, num_levels: int) -> np.ndarray:
    """``ddgm.quantization.levels_to_unit`` in numpy, with equal float32 results: 2 v / (K - 1) - 1.

    The loaders use it because torch's intra-op thread pool makes this small elementwise work slow
    when the CPU cores are busy (as they are while a model trains), and numpy runs it on one core.
    """
    check_num_levels(num_levels)
    unit = levels.astype(np.float32)
    unit *= np.float32(2.0 / (num_levels - 1))
    unit -= np.float32(1.0)
    return unit


@functools.lru_cache(maxsize=64)
def _pass_order(seed: int, num_shards: int, index: int) -> np.ndarray:
    """Order of the shards in pass ``index`` of the shard sequence (the same on every rank)."""
    return np.random.default_rng([seed, 0, index]).permutation(num_shards)


@dataclass(frozen=True)
class WindowPlan:
    """Which shards make up each window of one rank's stream, and how many samples it holds."""

    counts: tuple[int, ...]  # samples per shard of the split
    rank: int
    world_size: int
    seed: int
    shards_per_window: int

    def shards(self, window: int) -> list[int]:
        """Shard indices of ``window``, in stream order."""
        num_shards, per_window = len(self.counts), self.shards_per_window
        positions = range(window * per_window, (window + 1) * per_window)
        sequence = (self.rank + self.world_size * p for p in positions)
        return [int(_pass_order(self.seed, num_shards, s // num_shards)[s % num_shards]) for s in sequence]

    def size(self, window: int) -> int:
        return sum(self.counts[shard] for shard in self.shards(window))

    def locate(self, sample: int) -> tuple[int, int]:
        """(window, offset within it) of sample number ``sample`` of the rank's stream."""
        window = 0
        while sample >= (size := self.size(window)):
            sample -= size
            window += 1
        return window, sample


def keep(item: object) -> object:
    """DataLoader ``collate_fn`` that passes a worker's item on unchanged."""
    return item


class WindowStream(IterableDataset):
    """Windows ``first``, ``first + 1``, ... of one rank as (window index, uint8 levels [n, C, H, W],
    int64 labels [n]) numpy arrays; split over DataLoader workers as described in the module doc.
    Levels, not floats, cross from the workers (a quarter of the bytes), as numpy arrays through the
    worker's pipe (use ``collate_fn=keep``): faster here than torch's shared-memory hand-over of
    tensors, which waits for each worker to hand over a file descriptor."""

    def __init__(self, plan: WindowPlan, urls: list[str], entries: list[dict], image_shape: tuple[int, int, int],
                 num_levels: int, shuffle: bool, first: int) -> None:
        super().__init__()
        self.plan, self.urls, self.entries = plan, urls, entries
        self.image_shape, self.num_levels, self.shuffle, self.first = image_shape, num_levels, shuffle, first

    def window(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Build window ``index``: read its shards and permute their samples."""
        blocks = [read_shard(self.urls[s], self.entries[s], self.image_shape, self.num_levels)
                  for s in self.plan.shards(index)]
        levels = np.concatenate([block[0] for block in blocks])
        labels = np.concatenate([block[1] for block in blocks])
        if self.shuffle:
            plan = self.plan
            order = np.random.default_rng([plan.seed, 1, plan.rank, plan.world_size, index]).permutation(len(labels))
            levels, labels = levels[order], labels[order]
        return index, levels, labels

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.first + worker
        while True:
            yield self.window(index)
            index += num_workers
