"""Training images/s of the params.yaml model: shard loader vs in-memory tensors, 1 vs 2 processes.

Usage: python benchmarks/train_throughput.py [--params params.yaml] [--shards DIR] [--steps 10] [--warmup 3]
                                             [--batch-size N] [--threads 1] [--no-gpu]

Every row runs the real training loop (``ddgm.training.loop.train``) in a fresh process on the
model, objective and global batch of ``--params`` (by default params.yaml: U-Net, learned variance,
random-t ELBO with uniform t, batch 128) and reads the loop's own ``train/images_per_s`` (global:
all processes) for each step after ``--warmup`` steps:

  (a) 1 process, the shard TrainLoader (what pipeline.train uses)
  (b) 1 process, the same batches' worth of in-memory tensors (the TrainLoader replaced)
  (c) 2 processes (``accelerate launch --config_file infra/accelerate/cpu_2proc.yaml``,
      ACCELERATE_USE_CPU=true) with the TrainLoader
  (d) 1 process with the TrainLoader and one intra-op thread per CPU core instead
  and, when torch.cuda.is_available(), (a)-(c) on GPU (2 processes only with >= 2 GPUs).

Each process uses ``--threads`` intra-op threads (default 1, as torchrun sets for several
processes), so (a)-(c) compare like with like; on a busy machine more threads than free cores
can make a step many times slower (OpenMP threads wait for each other), which (d) shows.

Beside them, benchmarks/loader.py's ``loader_throughput`` gives the loader's own images/s with
no model, so one can see whether the loader could be the bottleneck. Validation and checkpoints
are pushed to the last step (outside the measured window). Without --shards the digits shards
are prepared in a temporary directory.

First, the step against a plain reference (``--skip-processes`` prints only this part): for each
of ``--step-threads`` (default 1 and 2) and each variant of the train settings (``defaults``: the
params file's; ``fp32``: mixed_precision no; ``importance t``: the importance sampler of t,
whose update runs every step; ``fp32, unfused AdamW``: also fused_optimizer false, close to
the step before the speed settings; ``bf16+channels_last``;
with ``--compile`` also the defaults plus train.compile), one fresh process alternates rounds of
  ref   a plain U-Net step on L_simple, written here: the same network (built from the same model
        config, so equal size), float32, eager, contiguous; uniform t, z_t = sqrt(abar_t) x +
        sqrt(1 - abar_t) eps, MSE on the eps channels, backward, torch.optim.AdamW's defaults
  step  ddgm's bare training step (ddgm.training.step.TrainingStep: model + objective + sampler
        update + clipping + optimizer + scheduler + EMA) on in-memory batches
  loop  the whole loop (ddgm.training.loop.train: shard loader + step + EMA + logging), its
        images/s over the second half of a 2N-step run (logged once, at the end of the window)
so their ratios are measured side by side: step/ref and "loop overhead" (loop time / step time - 1)
are medians over rounds of the ratio within one round.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "


# --------------------------------------------------------------------------- worker (one training run)


class InMemoryLoader:
    """TrainLoader's interface over the split held in memory as float tensors: shuffled global
    batches, this rank's slice of each, as many batches per epoch as the TrainLoader gives."""

    def __init__(self, shards, split="train", *, batch_size, rank=0, world_size=1, num_workers=0, seed=0,
                 shuffle_buffer=0, batches_per_epoch=None):
        import torch

        from ddgm.data import load_split, read_manifest
        from ddgm.quantization import levels_to_unit

        levels, _ = load_split(shards, split)
        self.images = levels_to_unit(levels, read_manifest(shards).num_levels).contiguous()
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.batches_per_epoch = batches_per_epoch or math.ceil(len(self.images) / (batch_size * world_size))
        self._torch = torch

    def epoch(self, e):
        torch = self._torch
        n, global_batch = len(self.images), self.batch_size * self.world_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        need = self.batches_per_epoch * global_batch
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))])
        labels = torch.full((self.batch_size,), -1, dtype=torch.int64)
        for b in range(self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            yield self.images[order[start:start + self.batch_size]], labels

    def batches(self, start=0):
        """Endless batches from batch position ``start`` (the TrainLoader's interface)."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            for index, batch in enumerate(self.epoch(epoch)):
                if index >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0


def _worker(args: argparse.Namespace) -> None:
    import torch

    import ddgm.training.loop as loop
    from ddgm.training.tracking import Tracker
    from pipeline.params import load_params, params_from_dict

    class Recorder(Tracker):
        def __init__(self) -> None:
            self.rates: dict[int, float] = {}

        def log_metrics(self, metrics, step):
            if "train/images_per_s" in metrics:
                self.rates[step] = metrics["train/images_per_s"]

    if args.worker == "memory":
        loop.TrainLoader = InMemoryLoader
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    values = {name: dataclasses.asdict(getattr(params, name)) for name in ("diffusion", "model", "train")}
    total = args.warmup + args.steps
    values["train"].update(
        max_steps=total, log_every=1, val_every=total, checkpoint_every=total, val_max_images=2, patience=0,
        resume=False, model_dir="models", checkpoint_dir="checkpoints", curve_file="plots/val_curve.tsv")
    if args.batch_size:
        values["train"]["batch_size"] = args.batch_size
    values["tracking"] = {"enabled": False}
    os.chdir(args.workdir)
    recorder = Recorder()
    params = params_from_dict(values)
    loop.train(params.model, params.diffusion, params.train, str(args.shards), make_tracker=lambda run_id: recorder)
    if recorder.rates:  # the main process
        measured = [recorder.rates[s] for s in range(args.warmup + 1, total + 1)]
        batch = values["train"]["batch_size"]
        print(RESULT + json.dumps({
            "images_per_s": len(measured) * batch / sum(batch / r for r in measured),  # all measured steps
            "median_step_images_per_s": statistics.median(measured),
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }), flush=True)


# --------------------------------------------------------------------------- worker (step vs plain reference)

STEP_VARIANTS = {  # name: overrides of the params file's train section
    "defaults": {},
    "fp32": {"mixed_precision": "no"},
    "importance t": {"timestep_sampler": "importance"},
    "fp32, unfused AdamW": {"mixed_precision": "no", "fused_optimizer": False},
    "bf16+channels_last": {"mixed_precision": "bf16", "channels_last": True},
    "defaults+compile": {"compile": True},
}


def _plain_reference_step(config, batches):
    """A textbook DDPM step on L_simple with ddgm's network for ``config`` (float32, eager, AdamW defaults)."""
    import torch
    import torch.nn.functional as F

    from ddgm.models import build_model

    model = build_model(config)
    network, diffusion = model.network, model.diffusion
    sqrt_abar, sqrt_one_minus_abar = diffusion.sqrt_abar, diffusion.sqrt_one_minus_abar
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    channels = config.image_shape[0]

    def step() -> None:
        x = next(batches)
        t = torch.randint(1, len(sqrt_abar), (x.shape[0],))
        noise = torch.randn_like(x)
        z_t = sqrt_abar[t].view(-1, 1, 1, 1) * x + sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(network(z_t, t)[:, :channels], noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _cycle(loader):
    return (x for x, _ in loader.batches())


def _timed(step, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step()
    return time.perf_counter() - started


def _step_worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    import ddgm.training.loop as loop
    from ddgm.config import ModelConfig
    from ddgm.data import read_manifest
    from ddgm.training.acceleration import batch_to_device
    from ddgm.training.step import build_training_step
    from ddgm.training.tracking import Tracker
    from pipeline.params import load_params, params_from_dict

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    values = {name: dataclasses.asdict(getattr(params, name)) for name in ("diffusion", "model", "train")}
    values["train"].update(STEP_VARIANTS[args.variant], resume=False, val_max_images=2, patience=0, model_dir="models",
                           checkpoint_dir="checkpoints", curve_file="val_curve.tsv")
    if args.batch_size:
        values["train"]["batch_size"] = args.batch_size
    values["tracking"] = {"enabled": False}
    params = params_from_dict(values)
    t, n = params.train, args.steps
    manifest = read_manifest(args.shards)
    config = ModelConfig.build(params.model, params.diffusion, manifest.image_shape, manifest.num_levels)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, step_scheduler_with_optimizer=False)
    batches = _cycle(InMemoryLoader(args.shards, batch_size=t.batch_size))
    reference = _plain_reference_step(config, batches)
    training_step = build_training_step(t, config, accelerator)
    counter = iter(range(1, 10**9))

    def bare() -> None:
        training_step(batch_to_device(next(batches), accelerator.device, t), next(counter))

    class Recorder(Tracker):
        rate = 0.0

        def log_metrics(self, metrics, step):
            if step == 2 * n and "train/images_per_s" in metrics:
                Recorder.rate = metrics["train/images_per_s"]

    def whole_loop(round_index: int) -> float:
        loop_values = copy.deepcopy(values)
        loop_values["train"].update(max_steps=2 * n, log_every=n, val_every=2 * n, checkpoint_every=2 * n)
        workdir = args.workdir / f"loop-{round_index}"
        workdir.mkdir(parents=True)
        os.chdir(workdir)
        p = params_from_dict(loop_values)
        loop.train(p.model, p.diffusion, p.train, str(args.shards), accelerator, lambda run_id: Recorder())
        return n * t.batch_size / Recorder.rate  # seconds for the n measured steps

    started = time.perf_counter()
    _timed(reference, args.warmup), _timed(bare, args.warmup)
    warmup_s = time.perf_counter() - started
    rounds = [{"ref": _timed(reference, n), "step": _timed(bare, n), "loop": whole_loop(r)} for r in range(args.rounds)]
    images = n * t.batch_size
    print(RESULT + json.dumps({k: statistics.median(images / r[k] for r in rounds) for k in ("ref", "step", "loop")} | {
        "step_vs_ref": statistics.median(r["ref"] / r["step"] for r in rounds),  # paired: rounds next to each other
        "loop_overhead": statistics.median(r["loop"] / r["step"] - 1 for r in rounds),
        "threads": torch.get_num_threads(), "warmup_s": warmup_s, "batch": t.batch_size,
        "mixed_precision": accelerator.mixed_precision}), flush=True)


def _run_step(variant: str, threads: int, args: argparse.Namespace, workdir: Path) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "step", "--variant", variant,
               "--workdir", str(workdir), "--params", str(args.params), "--shards", str(args.shards),
               "--steps", str(args.step_steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
               "--batch-size", str(args.batch_size or 0), "--threads", str(threads)]
    workdir.mkdir(parents=True)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        print(f"  step {variant}, {threads} thread(s): failed (status {done.returncode})\n{done.stderr[-2000:]}",
              file=sys.stderr)
        return None
    return json.loads(lines[-1][len(RESULT):])


def _step_table(rows: list[tuple[str, dict | None]]) -> str:
    head = (f"{'variant':<22} {'thr':>3} {'precision':>9} {'ref img/s':>9} {'step img/s':>10} {'step/ref':>8} "
            f"{'loop img/s':>10} {'loop overhead':>13}")
    lines = [head, "-" * len(head)]
    for label, r in rows:
        if r is None:
            lines.append(f"{label:<22} failed")
            continue
        lines.append(f"{label:<22} {r['threads']:>3} {r['mixed_precision']:>9} {r['ref']:>9.0f} {r['step']:>10.0f} "
                     f"{r['step_vs_ref']:>7.2f}x {r['loop']:>10.0f} {r['loop_overhead']:>12.1%}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- orchestrator


def _run(mode: str, processes: int, device: str, args: argparse.Namespace, workdir: Path,
         threads: int | None = None) -> dict | None:
    threads = threads or args.threads
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    worker = [str(Path(__file__).resolve()), "--worker", mode, "--workdir", str(workdir), "--params",
              str(args.params), "--shards", str(args.shards), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--batch-size", str(args.batch_size or 0), "--threads", str(threads)]
    if processes == 1:
        command = [sys.executable, *worker]
    elif device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # see infra/README.md: otherwise two world-size-1 runs
        command = ["accelerate", "launch", "--config_file", str(ROOT / "infra/accelerate/cpu_2proc.yaml"), *worker]
    else:
        command = ["accelerate", "launch", "--config_file", str(ROOT / "infra/accelerate/multi_gpu.yaml"),
                   "--num_processes", str(processes), *worker]
    workdir.mkdir(parents=True)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        print(f"  {mode}, {processes} process(es), {device}: failed (status {done.returncode})\n"
              f"{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(RESULT):])


def _loader_rates(shards: Path, batch_size: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loader import BASELINE, loader_throughput

    rates = loader_throughput(shards, batch_size=batch_size, epochs=3, workers=(0,))
    return {"TrainLoader": rates["TrainLoader, 0 workers"], "in-memory": rates[BASELINE]}


def _table(rows: list[tuple[str, dict | None, float | None]]) -> str:
    head = (f"{'run':<48} {'procs':>5} {'thr/proc':>8} {'train img/s':>11} {'median step':>11} "
            f"{'vs first':>8} {'loader alone img/s':>18}")
    lines = [head, "-" * len(head)]
    base = None
    for label, result, loader_alone in rows:
        if result is None:
            lines.append(f"{label:<48} {'failed':>5}")
            continue
        base = base or result["images_per_s"]
        alone = f"{loader_alone:>18.0f}" if loader_alone else f"{'':>18}"
        lines.append(f"{label:<48} {result['processes']:>5} {result['threads']:>8} {result['images_per_s']:>11.1f} "
                     f"{result['median_step_images_per_s']:>11.1f} {result['images_per_s'] / base:>8.2f} {alone}")
    return "\n".join(lines)


def _step_section(args: argparse.Namespace, workdir: Path) -> None:
    """The step against the plain reference, per thread count and variant (see the module doc)."""
    variants = args.variants or [v for v in STEP_VARIANTS if args.compile or v != "defaults+compile"]
    rows = [(variant, _run_step(variant, threads, args, workdir / f"step-{variant}-{threads}"))
            for threads in args.step_threads for variant in variants]
    print(f"\nbare step vs plain reference, 1 process, CPU ({args.rounds} alternating rounds of {args.step_steps} "
          "steps each, one process per row; img/s: median over rounds; step/ref and loop overhead: median over "
          "rounds of the ratio within a round)")
    print(_step_table(rows))


def _process_section(args: argparse.Namespace, tmp: Path, batch: int) -> None:
    """Rows (a)-(d) and their GPU counterparts (see the module doc)."""
    import torch

    loader_1 = _loader_rates(args.shards, batch)
    loader_2 = _loader_rates(args.shards, batch // 2)
    rows = [
        ("(a) CPU, 1 process, shard TrainLoader", _run("loader", 1, "cpu", args, tmp / "a"), loader_1["TrainLoader"]),
        ("(b) CPU, 1 process, in-memory tensors", _run("memory", 1, "cpu", args, tmp / "b"), loader_1["in-memory"]),
        ("(c) CPU, 2 processes (gloo), shard TrainLoader", _run("loader", 2, "cpu", args, tmp / "c"),
         2 * loader_2["TrainLoader"]),
        (f"(d) CPU, 1 process x {os.cpu_count()} threads, TrainLoader",
         _run("loader", 1, "cpu", args, tmp / "d", threads=os.cpu_count()), loader_1["TrainLoader"]),
    ]
    print(f"\nCPU, {args.threads} intra-op thread(s) per process unless said (train img/s: global, all "
          "processes; vs first: ratio to (a); loader alone: no model, per process x processes)")
    print(_table(rows))
    if torch.cuda.is_available() and not args.no_gpu:
        gpus = torch.cuda.device_count()
        gpu_rows = [
            ("(a) GPU, 1 process, shard TrainLoader", _run("loader", 1, "cuda", args, tmp / "ga"),
             loader_1["TrainLoader"]),
            ("(b) GPU, 1 process, in-memory tensors", _run("memory", 1, "cuda", args, tmp / "gb"),
             loader_1["in-memory"]),
        ]
        if gpus >= 2:
            gpu_rows.append(("(c) GPU, 2 processes (nccl), shard TrainLoader",
                             _run("loader", 2, "cuda", args, tmp / "gc"), 2 * loader_2["TrainLoader"]))
        print(f"\nGPU: {torch.cuda.get_device_name(0)} x {gpus}")
        print(_table(gpu_rows))
    else:
        print("\nGPU: none available (torch.cuda.is_available() is False); GPU rows skipped")
    print(f"\nloader alone at batch {batch}: TrainLoader {loader_1['TrainLoader']:.0f} img/s, in-memory DataLoader "
          f"{loader_1['in-memory']:.0f} img/s (benchmarks/loader.py, 1 process, 0 workers)")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--shards", type=Path, help="prepared dataset directory (default: digits in a temp dir)")
    parser.add_argument("--steps", type=int, default=10, help="measured training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (default: the params file's)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--step-threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="thread counts of the step-vs-reference rows (comma-separated)")
    parser.add_argument("--step-steps", type=int, default=20, help="steps per round in the step-vs-reference rows")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds in the step-vs-reference rows")
    parser.add_argument("--compile", action="store_true", help="add a train.compile variant (minutes to compile)")
    parser.add_argument("--skip-processes", action="store_true", help="only the step-vs-reference rows")
    parser.add_argument("--variants", type=lambda v: v.split(","),
                        help=f"step variants, comma-separated (default: all but compile): {', '.join(STEP_VARIANTS)}")
    parser.add_argument("--worker", choices=("loader", "memory", "step"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=tuple(STEP_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    if args.worker:
        _step_worker(args) if args.worker == "step" else _worker(args)
        return

    import torch

    from ddgm.data import DataParams, prepare_dataset
    from pipeline.params import load_params

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    batch = args.batch_size or params.train.batch_size
    m, d, t = params.model, params.diffusion, params.train
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.shards is None:
            args.shards = tmp / "shards"
            prepare_dataset(DataParams(), args.shards)
        args.shards = args.shards.resolve()
        print(f"model: {m.formulation}/{m.network} (base_channels {m.base_channels}, mults {m.channel_mults}, "
              f"{m.num_res_blocks} res blocks, attention at {m.attention_resolutions}), "
              f"variance {m.variance}, T={d.num_steps}; "
              f"objective {t.objective} ({t.timestep_sampler} t); global batch {batch}; "
              f"train: mixed_precision {t.mixed_precision}, compile {t.compile}, channels_last {t.channels_last}; "
              f"{os.cpu_count()} CPUs")
        _step_section(args, tmp)
        if not args.skip_processes:
            _process_section(args, tmp, batch)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

if __name__ == "__main__":
    main()
