"""Preemption: SIGTERM/SIGUSR1 (what SLURM and Kubernetes send before they stop a job) raise a flag;
the loop checkpoints at the next step boundary and raises ``Preempted``, whose exit status 75 asks
the scheduler to requeue the job, which then resumes from that checkpoint."""

from __future__ import annotations

import signal
from types import FrameType


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was written and the job should be requeued."""

    exit_code = 75  # EX_TEMPFAIL


class StopSignal:
    """Remembers that SIGTERM/SIGUSR1 arrived; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
