"""Shared test fixtures."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

pytest.register_assert_rewrite("support")  # support.py's asserts report like the test modules' own


@pytest.fixture(autouse=True, scope="session")
def shard_check_records(tmp_path_factory):
    """Shard verification records (ddgm.data.verification) go to a session folder, not ~/.cache,
    also for the subprocesses the tests start (they inherit the environment)."""
    import os

    saved = os.environ.get("DDGM_CACHE_DIR")
    os.environ["DDGM_CACHE_DIR"] = str(tmp_path_factory.mktemp("ddgm-cache"))
    yield
    if saved is None:
        os.environ.pop("DDGM_CACHE_DIR", None)
    else:
        os.environ["DDGM_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread (restored afterwards); opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``. The tests' tensors are small,
    and on a shared two-core machine thread contention makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The digits dataset prepared once per session (1000/350/447 images, 1x8x8, K=17), as the
    prepare stage writes it; returns the shard directory (absolute)."""
    from ddgm.data import DataParams, prepare_dataset

    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare_dataset(DataParams(out_dir=str(out)))
    return out


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """store(path) -> its sqlite URI: an empty MLflow store at ``path``, copied from one made once per session.
    Making a store's tables takes seconds (MLflow's schema migrations); a stage or client that finds them made
    only checks their version. (Making a new store, also by parallel writers, is tested in test_tracking.py.)"""
    import shutil

    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(template.parent)  # the Default experiment's artifacts: there, not under the caller's folder
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def store(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return store


@pytest.fixture
def restore_signals():
    """pipeline.train installs SIGTERM/SIGUSR1 handlers; put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
