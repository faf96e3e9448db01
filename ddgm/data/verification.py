"""Shard integrity: sha256 of shard bytes against the manifest, checked up front once per dataset version.

Two layers:

* every reader hashes each shard it reads (``check_shard_bytes``), local or remote, so a shard that
  differs from the manifest is caught while it is read, with the shard named;
* ``verify_once`` reads every byte of a local dataset's shards up front, but only once per dataset
  version and machine: what it checked is recorded (shard name, size, modification time, sha256) in a
  record keyed by the manifest's sha256 and the dataset's directory, and a later call re-reads only
  the shards whose size or modification time differ from the record.

The record lives in ``$DDGM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ddgm``, else ``~/.cache/ddgm``), under
``verified-shards/``; it is written atomically and never inside the dataset (a DVC output).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from ddgm.atomic import atomic_write
from ddgm.data.errors import DataError
from ddgm.data.location import local_dir, open_url
from ddgm.data.manifest import Manifest, manifest_hash, read_manifest, shard_urls

RECORD_DIR = "verified-shards"


def sha256_stream(stream: BinaryIO) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of everything left in a binary stream."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def check_digest(url: str, entry: dict, digest: str, size: int) -> None:
    """Raise DataError naming the shard if its size or sha256 differ from its manifest ``entry``."""
    if "size" in entry and size != entry["size"]:
        raise DataError(f"shard {url} has {size} bytes, the manifest lists {entry['size']} (truncated or changed?)")
    if digest != entry["sha256"]:
        raise DataError(f"shard {url} has sha256 {digest}, the manifest lists {entry['sha256']} (corrupt or changed?)")


def check_shard_bytes(url: str, entry: dict, data: bytes) -> None:
    """Check a shard's whole content, as read, against its manifest ``entry``."""
    check_digest(url, entry, hashlib.sha256(data).hexdigest(), len(data))


def _verify_one(url: str, entry: dict) -> None:
    try:
        stream = open_url(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard not found: {url}") from exc
    with stream:
        digest, size = sha256_stream(stream)
    check_digest(url, entry, digest, size)


def verify_shards(location: str | Path, splits: Iterable[str] | None = None) -> Manifest:
    """Check that every shard of ``splits`` (default: all) matches the manifest's size and sha256.

    Reads every byte; raises DataError naming the first bad shard. Returns the manifest.
    """
    manifest = read_manifest(location)
    for split in manifest.shards if splits is None else splits:
        for url, entry in zip(shard_urls(location, split, manifest), manifest.shards[split], strict=True):
            _verify_one(url, entry)
    return manifest


def _local_dataset(location: str | Path) -> Path:
    """The directory of a local dataset; DataError for a remote one."""
    directory = local_dir(location)
    if directory is None:
        raise DataError(f"only local datasets are verified up front; {location} is remote (checked while read)")
    return directory


def record_path(location: str | Path) -> Path:
    """The record of checked shards for the dataset version at a local ``location``."""
    directory = _local_dataset(location)
    key = hashlib.sha256(f"{manifest_hash(location)}\0{directory.resolve()}".encode()).hexdigest()[:32]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = os.environ.get("DDGM_CACHE_DIR") or user_cache / "ddgm"
    return Path(cache) / RECORD_DIR / f"{key}.json"


def _stat_key(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _read_record(path: Path) -> dict[str, dict]:
    try:
        record = json.loads(path.read_text())
        return {str(name): dict(value) for name, value in record["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no record yet, or an unreadable one: check everything again


def unchecked_shards(location: str | Path, splits: Iterable[str]) -> list[tuple[str, dict]]:
    """(url, manifest entry) of the shards of ``splits`` that the record does not vouch for: never
    checked, or their size or modification time differ from when they were checked."""
    manifest = read_manifest(location)
    recorded = _read_record(record_path(location))
    unchecked = []
    for split in splits:
        for url, entry in zip(shard_urls(location, split, manifest), manifest.shards[split], strict=True):
            seen = recorded.get(entry["name"])
            try:
                current = _stat_key(Path(url))
            except FileNotFoundError:
                current = None
            if seen is None or seen.get("sha256") != entry["sha256"] or seen.get("stat") != current:
                unchecked.append((url, entry))
    return unchecked


def _write_record(location: str | Path, checked: dict[str, dict]) -> None:
    path = record_path(location)
    record = _read_record(path) | checked
    directory = _local_dataset(location).resolve()
    text = json.dumps({"location": str(directory), "shards": record}, indent=1, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as exc:  # an unwritable cache costs a full check next time, nothing else
        warnings.warn(f"cannot record the checked shards in {path}: {exc}", stacklevel=3)


def verify_recorded(location: str | Path, splits: Iterable[str]) -> int:
    """Check the shards of ``splits`` that the record does not vouch for, and record them.

    Returns how many shards were read. Raises DataError/FileNotFoundError naming the first bad shard
    (shards checked before it are still recorded).
    """
    checked: dict[str, dict] = {}
    try:
        for url, entry in unchecked_shards(location, splits):
            before = _stat_key(Path(url)) if Path(url).is_file() else None
            _verify_one(url, entry)
            if before == _stat_key(Path(url)):  # not rewritten while it was read
                checked[entry["name"]] = {"sha256": entry["sha256"], "stat": before}
    finally:
        if checked:
            _write_record(location, checked)
    return len(checked)


def verify_once(location: str | Path, splits: Iterable[str], *, checker: bool, wait: Callable[[], None]) -> None:
    """Up-front check of a local dataset by one process per machine; the others wait for it.

    The process with ``checker`` true runs :func:`verify_recorded`; every process then calls
    ``wait()`` (a barrier, e.g. ``accelerator.wait_for_everyone``). Afterwards the checker re-raises
    its error, and any other process that finds shards the record does not vouch for (the checker
    failed, or could not write the record) checks those itself, so no process waits forever and
    none trains on unchecked shards.
    """
    splits = list(splits)
    error: BaseException | None = None
    if checker:
        try:
            verify_recorded(location, splits)
        except (DataError, OSError) as exc:  # re-raised after the barrier: no process is left waiting
            error = exc
    wait()
    if error is not None:
        raise error
    if not checker:
        for url, entry in unchecked_shards(location, splits):
            _verify_one(url, entry)
