"""Images/s of the sharded TrainLoader (0, 1, 2 workers) next to an in-memory TensorDataset DataLoader,
and the training step's own images/s for the default model of params.yaml: the loader can only be
the bottleneck where its rate comes near the step's.

Usage: python benchmarks/loader.py [--shards DIR] [--batch-size 128] [--epochs 5] [--batches-per-epoch N]
                                   [--params params.yaml] [--train-steps 10]
Without --shards, digits shards are prepared in a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddgm.data import DataParams, TrainLoader, load_split, prepare_dataset, read_manifest
from ddgm.models import build_model
from ddgm.objectives import compute_objective
from ddgm.params import load_params, model_config
from ddgm.quantization import levels_to_unit
from ddgm.timestep_sampler import make_timestep_sampler

BASELINE = "in-memory TensorDataset"


def _images_per_second(epochs: Iterable[Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> float:
    """Consume every batch of every epoch; images per wall-clock second."""
    count, start = 0, time.perf_counter()
    for batches in epochs:
        for images, _ in batches:
            count += len(images)
    return count / (time.perf_counter() - start)


def loader_throughput(
    shards: str | Path,
    batch_size: int = 128,
    epochs: int = 5,
    workers: Sequence[int] = (0, 1, 2),
    batches_per_epoch: int | None = None,
) -> dict[str, float]:
    """Images/s over ``epochs`` epochs (after one warm-up epoch) for the in-memory baseline and for
    the TrainLoader with each worker count. Worker start-up, paid every epoch, is included."""
    levels, labels = load_split(shards, "train")
    dataset = TensorDataset(levels_to_unit(levels, read_manifest(shards).num_levels), labels)
    baseline = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    results = {BASELINE: _images_per_second(baseline for _ in range(epochs + 1))}
    for n in workers:
        loader = TrainLoader(shards, batch_size=batch_size, num_workers=n, batches_per_epoch=batches_per_epoch)
        list(loader.epoch(0))
        results[f"TrainLoader, {n} workers"] = _images_per_second(loader.epoch(e) for e in range(1, epochs + 1))
    return results


def train_step_throughput(shards: str | Path, params_file: str | Path, batch_size: int, steps: int = 10) -> float:
    """Images/s of the default model's training step (objective, backward, AdamW) on in-memory batches,
    after two warm-up steps."""
    params = load_params(params_file)
    manifest = read_manifest(shards)
    model = build_model(model_config(params, manifest.image_shape, manifest.num_levels)).train()
    sampler = make_timestep_sampler(params.train.timestep_sampler, params.diffusion.num_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr)
    levels, _ = load_split(shards, "train")
    x = levels_to_unit(levels[:batch_size], manifest.num_levels)
    generator = torch.Generator().manual_seed(0)
    start = 0.0
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        loss = compute_objective(params.train.objective, model, x, sampler, generator, params.train.vlb_weight).loss
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return steps * len(x) / (time.perf_counter() - start)


def format_table(results: dict[str, float]) -> str:
    base = results[BASELINE]
    width = max(len(name) for name in results)
    lines = [f"{'loader':<{width}}  {'images/s':>10}  {'vs in-memory':>12}"]
    lines += [f"{name:<{width}}  {ips:>10.0f}  {ips / base:>12.3f}" for name, ips in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="prepared dataset directory (default: digits in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches-per-epoch", type=int, default=None)
    parser.add_argument("--params", default="params.yaml", help="params file whose model the training step uses")
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or prepare_dataset(DataParams(), Path(tmp) / "shards") and Path(tmp) / "shards"
        results = loader_throughput(shards, args.batch_size, args.epochs, batches_per_epoch=args.batches_per_epoch)
        step_rate = train_step_throughput(shards, args.params, args.batch_size, args.train_steps)
    print(f"batch size {args.batch_size}, {args.epochs} epochs, {torch.get_num_threads()} torch threads")
    print(format_table(results))
    slowest = min(v for k, v in results.items() if k != BASELINE)
    print(f"training step of the default model: {step_rate:.0f} images/s; "
          f"the slowest loader setting is {slowest / step_rate:.1f}x faster than the step")


if __name__ == "__main__":
    main()
