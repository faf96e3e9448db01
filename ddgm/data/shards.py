"""Shard format: webdataset tar files ``{split}-%06d.tar`` of samples ``{key}.npy`` + ``{key}.cls``.

``key`` is the sample's index within its split (6+ digits, no dots), ``.npy`` holds the uint8
levels (C, H, W) and ``.cls`` the label as decimal text (-1 = unlabelled). Tar headers carry
fixed mtime/owner/mode so that equal data gives byte-identical shards. Readers take a shard whole:
its sha256 is checked against the manifest, then it is decoded in one array pass
(:mod:`ddgm.data.tar_layout`), or member by member if it was written differently.
"""

from __future__ import annotations

import functools
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from ddgm.data.errors import DataError
from ddgm.data.location import open_url
from ddgm.data.tar_layout import decode_regular
from ddgm.data.verification import check_shard_bytes, sha256_file

TAR_HEADER = {"mtime": 0, "user": "ddgm", "group": "ddgm", "mode": 0o444}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_split(
    directory: str | Path, split: str, images: np.ndarray, labels: np.ndarray, samples_per_shard: int
) -> list[dict]:
    """Write one split's uint8 images (N, C, H, W) and labels as shards; return their manifest entries."""
    directory = Path(directory)
    n = len(images)
    if n == 0:
        return []
    pattern = str(directory).replace("%", "%%") + "/" + split + "-%06d.tar"
    with wds.ShardWriter(
        pattern, maxcount=samples_per_shard, maxsize=math.inf, verbose=0, encoder=False, **TAR_HEADER
    ) as sink:
        for index in range(n):
            sink.write(encode_sample(index, images[index], int(labels[index])))
    entries = []
    for i in range(math.ceil(n / samples_per_shard)):
        path = directory / shard_name(split, i)
        entries.append(
            {
                "name": path.name,
                "count": min(samples_per_shard, n - i * samples_per_shard),
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
            }
        )
    return entries


def encode_sample(index: int, levels: np.ndarray, label: int) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(levels, dtype=np.uint8), allow_pickle=False)
    return {"__key__": f"{index:06d}", "npy": buffer.getvalue(), "cls": str(label).encode()}


@functools.lru_cache(maxsize=8)
def _npy_header(image_shape: tuple[int, int, int]) -> bytes:
    """The .npy header that ``encode_sample`` writes before the raw bytes of a uint8 image."""
    encoded = encode_sample(0, np.zeros(image_shape, dtype=np.uint8), 0)["npy"]
    return encoded[: len(encoded) - math.prod(image_shape)]


def decode_sample(
    sample: dict, url: str, image_shape: tuple[int, int, int], num_levels: int
) -> tuple[np.ndarray, int]:
    """Tar members of one sample -> (uint8 levels (C, H, W), label); errors name the shard and key."""
    key = sample.get("__key__")
    missing = {"npy", "cls"} - set(sample)
    if missing:
        raise DataError(f"shard {url}: sample {key} lacks {sorted(missing)} (corrupt or truncated shard)")
    data, header = sample["npy"], _npy_header(image_shape)
    try:
        label = int(sample["cls"].decode())
        if len(data) == len(header) + math.prod(image_shape) and data.startswith(header):
            levels = np.frombuffer(data, dtype=np.uint8, offset=len(header)).reshape(image_shape)
        else:  # not the expected format: parse it fully for a precise message below
            levels = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"shard {url}: sample {key} cannot be decoded: {exc}") from exc
    if levels.dtype != np.uint8 or levels.shape != tuple(image_shape):
        raise DataError(
            f"shard {url}: sample {key} is {levels.dtype} {levels.shape}, expected uint8 {tuple(image_shape)}"
        )
    if num_levels < 256 and levels.max() >= num_levels:
        raise DataError(f"shard {url}: sample {key} has level {levels.max()}, expected < {num_levels}")
    return levels, label


def _read_bytes(url: str) -> bytes:
    try:
        stream = open_url(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard not found: {url}") from exc
    try:
        with stream:
            return stream.read()
    except OSError as exc:
        raise DataError(f"shard {url} cannot be read: {type(exc).__name__}: {exc}") from exc


def _decode_members(url: str, data: bytes, image_shape: tuple[int, int, int],
                    num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The generic reader: tar members grouped into samples by key, each decoded on its own."""
    files = tar_file_expander([{"url": url, "stream": io.BytesIO(data)}], handler=reraise_exception)
    levels, labels = [], []
    try:
        for sample in group_by_keys(files, handler=reraise_exception):
            image, label = decode_sample(sample, url, image_shape, num_levels)
            levels.append(image)
            labels.append(label)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        reason = exc.args[0] if exc.args else ""
        raise DataError(f"shard {url} is corrupt or truncated: {type(exc).__name__}: {reason}") from exc
    if not levels:
        return np.empty((0, *image_shape), dtype=np.uint8), np.empty(0, dtype=np.int64)
    return np.stack(levels), np.array(labels, dtype=np.int64)


def read_shard(url: str, entry: dict, image_shape: tuple[int, int, int],
               num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """All samples of one shard in stored order: (uint8 levels [n, C, H, W], int64 labels [n]).

    ``entry`` is the shard's manifest entry (count, sha256, size). The whole shard is read and its
    size and sha256 checked before anything is decoded; raises DataError naming the shard if it
    differs from the manifest, is corrupt, or holds another number of samples than ``entry["count"]``,
    and FileNotFoundError if it is missing. Shards in the layout that ``write_split`` writes are
    decoded with array operations, others member by member. The levels may be a read-only view.
    """
    data = _read_bytes(url)
    check_shard_bytes(url, entry, data)
    count = int(entry["count"])
    block = decode_regular(data, count, image_shape, num_levels, _npy_header(image_shape))
    if block is None:
        block = _decode_members(url, data, image_shape, num_levels)
    if len(block[1]) != count:
        raise DataError(
            f"shard {url} holds {len(block[1])} samples, the manifest lists {count} (truncated or corrupt shard)")
    return block
