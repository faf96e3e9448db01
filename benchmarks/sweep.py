"""Wall time of two small DVC experiments run one after the other (`-j 1`) and side by side (`-j 2`).

Usage: python benchmarks/sweep.py [--rounds 1] [--keep DIR] [-S section.key=value ...]

Each round copies this repository (its files as they are in the working tree) into a fresh git
repository, so that no run-cache is shared, with small params (T=10, a one-layer MLP,
`train.max_steps=20`, `sample.num_samples=100`, a short evaluation; `-S` adds or overrides
settings, e.g. `-S train.max_steps=200`), prepares the data, queues the same two experiments
(`dvc exp run --queue`, two learning rates) and runs them with `dvc exp run --run-all -j N` (what
`dvc queue start -j N` does, but waiting for the end). The stages pick their thread counts
themselves (OMP_NUM_THREADS is removed from their environment). Rounds alternate the order of
`-j 1` and `-j 2`; the script prints each wall time, the medians, their ratio, and the threads
each stage process reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "diffusion": {"num_steps": 10},
    "model": {"network": "mlp", "hidden_dim": 64, "depth": 2},
    "train": {"max_steps": 20, "val_every": 20, "batch_size": 64, "val_batch_size": 256, "val_chunk": 10,
              "checkpoint_every": 20},
    "sample": {"num_samples": 100, "num_steps": 10, "batch_size": 100},
    "evaluate": {"batch_size": 256, "chunk": 10, "classifier_epochs": 5, "comparison_steps": [5],
                 "comparison_samples": 100},
}
LEARNING_RATES = ("0.001", "0.004")


def environment() -> dict[str, str]:
    """This environment without settings that would pin the stages' threads or tracking."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MLFLOW_TRACKING_URI", "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR")}
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
    return env


def run(cmd: list[str], cwd: Path) -> str:
    """``cmd``'s output, through a file: the queue workers `dvc exp run --run-all` starts outlive it."""
    with tempfile.TemporaryFile("w+") as log:
        result = subprocess.run(cmd, check=False, cwd=cwd, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        log.seek(0)
        output = log.read()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {result.returncode}:\n{output[-6000:]}")
    return output


def apply_settings(params: dict, settings: dict, overrides: list[str]) -> dict:
    """params.yaml with the small settings and the `section.key=value` overrides applied."""
    for section, values in settings.items():
        params[section].update(values)
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        params[section][name] = yaml.safe_load(value)
    return params


def make_project(dest: Path, overrides: list[str]) -> Path:
    """A fresh git + DVC repository holding this repository's files, small params and prepared data."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    params = apply_settings(yaml.safe_load((dest / "params.yaml").read_text()), SMALL, overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "--no-verify", "-m", "sweep benchmark"], dest)
    run(["dvc", "repro", "prepare"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "--no-verify", "-m", "prepared"], dest)
    return dest


def timed_sweep(project: Path, jobs: int) -> tuple[float, list[str]]:
    """Seconds to run the two queued experiments with ``jobs`` workers, and the thread lines they printed."""
    names = [f"j{jobs}-lr-{lr}" for lr in LEARNING_RATES]
    for name, lr in zip(names, LEARNING_RATES, strict=True):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], project)
    start = time.perf_counter()
    try:
        run(["dvc", "exp", "run", "--run-all", "-j", str(jobs)], project)
    finally:
        run(["dvc", "queue", "stop"], project)  # the idle workers exit
    seconds = time.perf_counter() - start
    threads = [f"{name}: {line}" for name in names
               for line in re.findall(r"using \d+ thread\(s\): [^\n]*", run(["dvc", "queue", "logs", name], project))]
    return seconds, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="build the projects under this folder and keep them")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="section.key=value")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; two experiments: {' / '.join(f'train.lr={lr}' for lr in LEARNING_RATES)}")
    base = args.keep or Path(tempfile.mkdtemp(prefix="ddgm-sweep-"))
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for round_index in range(args.rounds):
            for jobs in ((1, 2) if round_index % 2 == 0 else (2, 1)):
                project = make_project(base / f"round{round_index}-j{jobs}", args.overrides)
                seconds, threads = timed_sweep(project, jobs)
                times[jobs].append(seconds)
                print(f"round {round_index + 1}: -j {jobs}: {seconds:.1f} s")
                for line in threads:
                    print(f"    {line}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    sequential, parallel = statistics.median(times[1]), statistics.median(times[2])
    print(f"one after the other (-j 1): {sequential:.1f} s; side by side (-j 2): {parallel:.1f} s; "
          f"-j 2 / -j 1 = {parallel / sequential:.2f}")


if __name__ == "__main__":
    main()
