"""How many torch threads a stage process uses: its share of the machine's cores.

Two processes that each start one thread per core on the same cores slow each other down
several times over (OpenMP threads spin while they wait for a core). So each process takes
- ``compute.threads`` when set, else
- ``$OMP_NUM_THREADS`` when set, else
- cores // (processes the launcher started on this node x DVC experiments running now),
  at least 1. The launcher's count is ``$LOCAL_WORLD_SIZE`` (torchrun, accelerate launch);
  the running experiments are the temporary workspaces that ``dvc exp run --temp`` and the
  experiment queue (``dvc queue start -j N``) hold under ``.dvc/tmp/exps`` of the project
  (``$DVC_ROOT``), plus this process when it runs outside them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddgm.training.tracking import project_root
from pipeline.params import ComputeParams

EXPERIMENT_WORKSPACES = (".dvc/tmp/exps", ".dvc/tmp/exps/standalone")  # where DVC's executors put tmp* folders


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or container allotment)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def positive_int(name: str, value: str | None) -> int | None:
    """``value`` as an integer >= 1, None when unset or empty; else a ValueError naming ``name``."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def running_experiments(root: Path, cwd: Path) -> int:
    """DVC experiments running now in project ``root``: its temporary experiment workspaces, plus
    one for the process in ``cwd`` when that is not one of them (a workspace run or a plain stage)."""
    workspaces = [d.resolve() for parent in EXPERIMENT_WORKSPACES for d in (root / parent).glob("tmp*") if d.is_dir()]
    inside = any(cwd == d or d in cwd.parents for d in workspaces)
    return len(workspaces) + (0 if inside else 1)


def thread_count(compute: ComputeParams) -> tuple[int, str]:
    """The number of threads for this process and where it comes from."""
    if compute.threads is not None:
        return compute.threads, "compute.threads"
    chosen = positive_int("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "").split(",")[0])  # "4,2": nested
    if chosen:
        return chosen, "OMP_NUM_THREADS"
    cores = usable_cores()
    local = positive_int("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE")) or 1
    experiments = running_experiments(project_root(), Path.cwd().resolve())
    return max(1, cores // (local * experiments)), (
        f"{cores} cores / ({local} process(es) of this launch x {experiments} running experiment(s))")


def apply_threads(compute: ComputeParams) -> int:
    """Set torch's intra-op thread count for this process (see the module doc); returns it."""
    count, source = thread_count(compute)
    torch.set_num_threads(count)
    print(f"using {count} thread(s): {source}", flush=True)
    return count
