"""Seconds from process start to the first optimizer step: a fresh start and a resume, over synthetic
shards of several sizes, on 1 and 2 processes.

Usage: python benchmarks/startup.py [--sizes 10e6,1e9] [--processes 1,2] [--repeats 3] [--image-shape 3,32,32]
                                    [--params params.yaml] [--workdir DIR]

For each dataset size (bytes of train + val + test shards, about) random uint8 images are prepared
as shards; then, for each process count, a fresh run (nothing recorded about these shards yet: every
byte of train and val is checked) trains one step and writes its checkpoint, and a resume of it
trains the next step. Each run is a new process (``accelerate launch`` for 2), timed from just
before it is started to the first optimizer step its main process logs; each row is the median of
``--repeats`` such pairs (a repeat starts over with nothing recorded). Rows:
``<fresh|resume> <processes> <dataset bytes> <seconds>``. Model and training settings come from
``--params`` with a global batch of 8 (the step itself is not what is measured). The shards were
just written, so they are read from the page cache: on a cold cache a full check takes longer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIRST_STEP = "FIRST_STEP_AT "
BYTES_PER_IMAGE_OVERHEAD = 2048  # tar headers of the .npy and .cls members, the .npy header, padding


def _worker(params_file: str) -> None:
    """One training run; the main process prints the wall-clock time of its first logged step."""
    from ddgm.training.loop import train
    from ddgm.training.tracking import Tracker
    from pipeline.params import load_params

    class FirstStep(Tracker):
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            if "train/loss" in metrics and not getattr(self, "seen", False):
                self.seen = True
                print(f"{FIRST_STEP}{time.time():.6f}", flush=True)

    params = load_params(params_file)
    train(params.model, params.diffusion, params.train, params.data.out_dir, make_tracker=lambda run_id: FirstStep())


def prepare_synthetic(directory: Path, total_bytes: float, image_shape: tuple[int, int, int]) -> tuple[Path, int]:
    """Shards of random images, about ``total_bytes`` in all; (dataset dir, bytes of its shards)."""
    from ddgm.data import DataParams, prepare_dataset

    channels, height, width = image_shape
    count = max(100, int(total_bytes / (channels * height * width + BYTES_PER_IMAGE_OVERHEAD)))
    images = np.random.default_rng(0).integers(0, 256, (count, height, width, channels), dtype=np.uint8)
    source = directory / "images.npy"
    np.save(source, images[..., 0] if channels == 1 else images)
    del images
    prepare_dataset(DataParams(source="array", path=str(source), samples_per_shard=128), directory / "shards")
    source.unlink()
    return directory / "shards", sum(p.stat().st_size for p in (directory / "shards").glob("*.tar"))


def _write_params(base: Path, run_dir: Path, shards: Path, max_steps: int) -> Path:
    doc = yaml.safe_load(base.read_text())
    doc["data"]["out_dir"] = str(shards)
    doc["train"].update(
        checkpoint_dir=str(run_dir / "checkpoints"), model_dir=str(run_dir / "models"),
        curve_file=str(run_dir / "val_curve.tsv"), max_steps=max_steps, batch_size=8, grad_accum=1,
        log_every=1, val_every=10**9, val_max_images=2, checkpoint_every=10**9, resume=True)
    doc["tracking"]["enabled"] = False
    path = run_dir / f"params-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def time_to_first_step(params_file: Path, processes: int, cache_dir: Path) -> float:
    """Seconds from starting the run's process(es) to its first optimizer step."""
    script = [str(Path(__file__).resolve()), "--worker", str(params_file)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "infra" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", str(processes), *script]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", DDGM_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stamps = [float(line[len(FIRST_STEP):]) for line in done.stdout.splitlines() if line.startswith(FIRST_STEP)]
    if not stamps:
        raise RuntimeError(f"the run logged no step:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return stamps[0] - start


def _fresh_and_resume(run_dir: Path, shards: Path, processes: int, base_params: Path) -> tuple[float, float]:
    """(fresh, resume) seconds to the first step of a new run in ``run_dir`` and of its resumption."""
    run_dir.mkdir()
    cache = run_dir / "cache"  # empty: a fresh start finds nothing recorded about these shards
    fresh = time_to_first_step(_write_params(base_params, run_dir, shards, 1), processes, cache)
    resume = time_to_first_step(_write_params(base_params, run_dir, shards, 2), processes, cache)
    return fresh, resume


def check_seconds(shards: Path, cache_dir: Path) -> tuple[float, float, float]:
    """The up-front shard check alone, in this process: (reading every train and val byte, as every
    process did on every start before the record existed; the first recorded check; a later one)."""
    from ddgm.data.verification import verify_recorded, verify_shards

    os.environ["DDGM_CACHE_DIR"] = str(cache_dir)
    seconds = []
    for check in (lambda: verify_shards(shards, ["train", "val"]), lambda: verify_recorded(shards, ["train", "val"]),
                  lambda: verify_recorded(shards, ["train", "val"])):
        start = time.perf_counter()
        check()
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1], seconds[2]


def run_cases(workdir: Path, sizes: list[float], processes: list[int], repeats: int,
              image_shape: tuple[int, int, int], base_params: Path) -> list[tuple[str, int, int, float]]:
    rows = []
    for size in sizes:
        data_dir = workdir / f"data-{size:.0e}"
        data_dir.mkdir()
        shards, nbytes = prepare_synthetic(data_dir, size, image_shape)
        checks = check_seconds(shards, data_dir / "check-cache")
        for count in processes:
            pairs = [_fresh_and_resume(workdir / f"run-{size:.0e}-{count}-{r}", shards, count, base_params)
                     for r in range(repeats)]
            medians = map(statistics.median, zip(*pairs, strict=True))  # (fresh, resume) seconds
            for kind, seconds in zip(("fresh", "resume"), medians, strict=True):
                rows.append((kind, count, nbytes, seconds))
                print(f"{kind:<7}{count:>5}{nbytes:>14}{seconds:>9.2f}", flush=True)
        print(f"  (shard check alone over {nbytes} bytes: full read {checks[0]:.2f} s, first recorded check "
              f"{checks[1]:.2f} s, with the record {checks[2]:.3f} s)", flush=True)
        shutil.rmtree(data_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10e6,1e9", help="dataset sizes in bytes, comma-separated")
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; rows are medians")
    parser.add_argument("--image-shape", default="3,32,32", help="C,H,W of the synthetic images")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="model and training settings")
    parser.add_argument("--workdir", help="where to put shards and runs (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    sizes = [float(s) for s in args.sizes.split(",")]
    processes = [int(p) for p in args.processes.split(",")]
    image_shape = tuple(int(v) for v in args.image_shape.split(","))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print(f"{'case':<7}{'procs':>5}{'dataset bytes':>14}{'seconds':>9}", flush=True)
        rows = run_cases(Path(tmp), sizes, processes, args.repeats, image_shape, Path(args.params))
    by_case = {(kind, count, nbytes): seconds for kind, count, nbytes, seconds in rows}
    for count in processes:
        resumes = sorted((nbytes, s) for (kind, c, nbytes), s in by_case.items() if kind == "resume" and c == count)
        if len(resumes) > 1:
            (small, t_small), (large, t_large) = resumes[0], resumes[-1]
            verdict = "within" if t_large <= 1.5 * t_small + 2 else "NOT within"
            print(f"{count} process(es): resume over {large} bytes {t_large:.2f} s vs {small} bytes {t_small:.2f} s: "
                  f"{verdict} 1.5x + 2 s")


if __name__ == "__main__":
    main()
