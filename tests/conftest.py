"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


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
