"""Write an output directory completely before it appears under its final name."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target``; on success it replaces ``target``.

    An existing ``target`` is renamed away, the new directory renamed in, then the old one deleted,
    so ``target`` is never half-written. On error the temporary directory is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "new")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
