"""Shard format: webdataset tar files ``{split}-%06d.tar`` of samples ``{key}.npy`` + ``{key}.cls``.

``key`` is the sample's index within its split (6+ digits, no dots), ``.npy`` holds the uint8
levels (C, H, W) and ``.cls`` the label as decimal text (-1 = unlabelled). Tar headers carry
fixed mtime/owner/mode so that equal data gives byte-identical shards.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from ddgm.data.errors import DataError
from ddgm.data.location import open_url
from ddgm.data.manifest import Manifest, read_manifest, shard_urls

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
                "sha256": _sha256_file(path),
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
    data, header = sample["npy"], _npy_header(tuple(image_shape))
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


def read_shard(
    url: str, count: int, image_shape: tuple[int, int, int], num_levels: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Decoded samples of one shard in order; raises DataError naming the shard if it is unreadable,
    corrupt, or (once read to the end) holds a different number of samples than ``count``."""
    try:
        stream = open_url(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard not found: {url}") from exc
    seen = 0
    with stream:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        try:
            for sample in group_by_keys(files, handler=reraise_exception):
                yield decode_sample(sample, url, image_shape, num_levels)
                seen += 1
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            reason = exc.args[0] if exc.args else ""
            raise DataError(f"shard {url} is corrupt or truncated: {type(exc).__name__}: {reason}") from exc
    if seen != count:
        raise DataError(f"shard {url} holds {seen} samples, the manifest lists {count} (truncated or corrupt shard)")


def read_shards(
    urls: Iterable[str], counts: Iterable[int], image_shape: tuple[int, int, int], num_levels: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Samples of several shards, one after the other."""
    for url, count in zip(urls, counts, strict=True):
        yield from read_shard(url, count, image_shape, num_levels)


def verify_shards(location: str | Path, splits: Iterable[str] | None = None) -> Manifest:
    """Check that every shard of ``splits`` (default: all) matches the manifest's size and sha256.

    Reads every byte (cheap for local datasets); raises DataError naming the first bad shard.
    Returns the manifest.
    """
    manifest = read_manifest(location)
    for split in manifest.shards if splits is None else splits:
        for url, entry in zip(shard_urls(location, split, manifest), manifest.shards[split], strict=True):
            try:
                stream = open_url(url)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"shard not found: {url}") from exc
            with stream:
                digest, size = _sha256_stream(stream)
            if "size" in entry and size != entry["size"]:
                raise DataError(f"shard {url} has {size} bytes, the manifest lists {entry['size']} (truncated?)")
            if digest != entry["sha256"]:
                raise DataError(f"shard {url} has sha256 {digest}, the manifest lists {entry['sha256']} (corrupt?)")
    return manifest


def _sha256_stream(stream) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)[0]
