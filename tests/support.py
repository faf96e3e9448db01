"""Helpers shared by the test modules: free ports, file hashes, process groups, subprocess environments,
params overrides and a copy of the repository.

Imported as ``from support import ...``: pytest's default (prepend) import mode puts tests/ (which has
no __init__.py) first on sys.path before it imports conftest.py and the test modules.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# DVC without analytics and a fixed git identity, for subprocesses that run dvc or commit to a throw-away repo.
DVC_GIT_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the probing socket is closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_group(proc: subprocess.Popen) -> None:
    """Test cleanup: SIGKILL the group of a still-running ``proc`` (start_new_session=True) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def scaled(values: dict, overrides: dict) -> dict:
    """``values`` with ``overrides`` ({section: {key: value}}) applied; every overridden key must already exist."""
    out = copy.deepcopy(values)
    for section, changes in overrides.items():
        for key, value in changes.items():
            assert key in out[section], f"{section}.{key} is not a params key"
            out[section][key] = value
    return out


# Tiny values for params.yaml / the presets (pipeline runs of seconds): keys that must already exist.
TINY = {
    "diffusion": {"num_steps": 10},
    "model": {"network": "mlp", "hidden_dim": 32, "depth": 1},
    "train": {"max_steps": 20, "warmup_steps": 2, "batch_size": 32, "val_every": 10, "val_batch_size": 256,
              "val_chunk": 10, "checkpoint_every": 10, "log_every": 5},
    "sample": {"num_samples": 50, "num_steps": 5, "batch_size": 50},
    "evaluate": {"batch_size": 256, "chunk": 10, "classifier_epochs": 3, "comparison_steps": [2, 5],
                 "comparison_samples": 20},
}


def copy_repo(dest: Path) -> None:
    """The tracked files of this repository, as they are in the working tree, copied under ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # tracked but deleted in the working tree: leave it out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def repo_pythonpath() -> str:
    """The caller's PYTHONPATH with the repository root first (just the root when it is unset or empty)."""
    current = os.environ.get("PYTHONPATH")
    return f"{ROOT}{os.pathsep}{current}" if current else str(ROOT)


def subprocess_env(*, unset: Iterable[str] = (), venv_on_path: bool = True, **overrides: str | None) -> dict[str, str]:
    """os.environ for a CPU-only subprocess: venv first on PATH, ``unset`` removed, no GPU, one OMP thread, then
    ``overrides`` (None removes a variable)."""
    env = dict(os.environ)
    if venv_on_path:
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for name in unset:
        env.pop(name, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes, also on GPU machines
    env["OMP_NUM_THREADS"] = "1"  # two shared cores
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def rank_reports(output: str) -> list[str]:
    """Sorted 'RANK r WORLD w TYPE t BACKEND b KEY value' reports of test rank scripts, found also where
    two ranks' writes to one stdout pipe interleave within a line."""
    return sorted(re.findall(r"RANK \d+ WORLD \d+ TYPE \w+ BACKEND \w+ [A-Z]+ [\d.]+", output))
