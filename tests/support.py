"""Helpers shared by the test modules: free ports, file hashes, process groups, subprocess environments,
params overrides and a copy of the repository.

Imported as ``from support import ...``: pytest's default (prepend) import mode puts tests/ (which has
no __init__.py) first on sys.path before it imports conftest.py and the test modules.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BIN = Path(sys.executable).parent  # this interpreter's folder: in a venv or conda env, also its tools

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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
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
    """The files git would commit (tracked, or new and not ignored), as they are in the working tree, copied
    under ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # tracked but deleted in the working tree: leave it out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def repo_pythonpath() -> str:
    """The caller's PYTHONPATH with the repository root first (just the root when it is unset or empty)."""
    current = os.environ.get("PYTHONPATH")
    return f"{ROOT}{os.pathsep}{current}" if current else str(ROOT)


# Commands that scripts and tools run by name, and the module each runs as (None: the interpreter itself).
TOOLS = {"python": None, "python3": None, "dvc": "dvc", "mlflow": "mlflow",
         "accelerate": "accelerate.commands.accelerate_cli"}


@functools.cache
def tool_dir() -> Path:
    """A folder (removed at exit) of stand-ins for ``python``, ``dvc``, ``mlflow`` and ``accelerate`` that run them
    with the interpreter running the tests, so that shell scripts, DVC stages and launchers calling them by name
    use this Python environment, wherever it is (a venv anywhere, conda, a module, a user install)."""
    folder = Path(tempfile.mkdtemp(prefix="ddgm-tools-"))
    atexit.register(shutil.rmtree, folder, True)
    for name, module in TOOLS.items():
        command = shlex.quote(sys.executable) + (f" -m {module}" if module else "")
        (folder / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (folder / name).chmod(0o755)
    return folder


def subprocess_env(*, unset: Iterable[str] = (), venv_on_path: bool = True, **overrides: str | None) -> dict[str, str]:
    """os.environ for a CPU-only subprocess: this environment's tools first on PATH (tool_dir(), then the
    interpreter's folder), ``unset`` removed, no GPU, one OMP thread, then ``overrides`` (None removes a variable)."""
    env = dict(os.environ)
    if venv_on_path:
        env["PATH"] = os.pathsep.join([str(tool_dir()), str(PYTHON_BIN), env.get("PATH", "")])
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


def wait_for_health(url: str, server: subprocess.Popen, log: Path, seconds: float) -> None:
    """Poll ``url``/health until it answers 200; fail with the server's log when it exits or
    ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None, f"server exited {server.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"server did not answer in {seconds} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)
