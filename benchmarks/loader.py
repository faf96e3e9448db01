"""Images/s of the sharded TrainLoader (0, 1, 2 workers) next to an in-memory TensorDataset DataLoader,
and the training step's own images/s for the default model of params.yaml: the loader can only be
the bottleneck where its rate comes near the step's.

Usage: python benchmarks/loader.py [--shards DIR | --image-shape C,H,W [--num-images 10000]] [--batch-size 128]
                                   [--epochs E] [--rounds 3] [--batches-per-epoch N] [--params params.yaml]
                                   [--train-steps 10]
Without --shards, digits shards (or, with --image-shape, shards of random uint8 images of that shape) are
prepared in a temporary directory. The settings are measured in alternating rounds; each row is the
median over the rounds, so the ratios compare settings measured side by side. Rates count the batches
after the first (a training run starts its loader once); the seconds to the first batch are printed
below the table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddgm.config import ModelConfig
from ddgm.data import (
    DataParams,
    TrainLoader,
    load_split,
    prepare_dataset,
    read_manifest,
)
from ddgm.models import build_model
from ddgm.objectives import compute_objective
from ddgm.quantization import levels_to_unit
from ddgm.timestep_sampler import make_timestep_sampler
from pipeline.params import load_params

BASELINE = "in-memory TensorDataset"


def _measure(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Consume every batch: (seconds to the first batch, images per wall-clock second after it)."""
    start = time.perf_counter()
    iterator = iter(batches)
    next(iterator)
    first = time.perf_counter()
    count = sum(len(images) for images, _ in iterator)
    return first - start, count / (time.perf_counter() - first)


def loader_throughput(
    shards: str | Path,
    batch_size: int = 128,
    epochs: int = 5,
    workers: Sequence[int] = (0, 1, 2),
    batches_per_epoch: int | None = None,
    rounds: int = 1,
    startup: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median images/s over ``rounds`` alternating rounds for the in-memory baseline (``epochs``
    epochs) and for the TrainLoader with each worker count (one stream of as many batches, read as
    the training loop reads it: its workers start once per run). The rate counts the batches after
    the first; the median seconds to the first batch go to ``startup`` if given."""
    levels, labels = load_split(shards, "train")
    dataset = TensorDataset(levels_to_unit(levels, read_manifest(shards).num_levels), labels)
    baseline = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    settings = {BASELINE: lambda: chain.from_iterable(baseline for _ in range(epochs))}
    for n in workers:
        loader = TrainLoader(shards, batch_size=batch_size, num_workers=n, batches_per_epoch=batches_per_epoch)
        settings[f"TrainLoader, {n} workers"] = lambda loader=loader: islice(
            loader.batches(), epochs * loader.batches_per_epoch)
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, make_batches in settings.items():
            measured[name].append(_measure(make_batches()))
    if startup is not None:
        startup.update({name: statistics.median(m[0] for m in values) for name, values in measured.items()})
    return {name: statistics.median(m[1] for m in values) for name, values in measured.items()}


def synthetic_shards(directory: Path, image_shape: tuple[int, int, int], num_images: int) -> Path:
    """Prepare shards of ``num_images`` random uint8 images (C, H, W) with the array source; return their dir."""
    channels, height, width = image_shape
    images = np.random.default_rng(0).integers(0, 256, (num_images, height, width, channels), dtype=np.uint8)
    np.save(directory / "images.npy", images[..., 0] if channels == 1 else images)
    prepare_dataset(DataParams(source="array", path=str(directory / "images.npy")), directory / "shards")
    return directory / "shards"


def train_step_throughput(shards: str | Path, params_file: str | Path, batch_size: int, steps: int = 10) -> float:
    """Images/s of the default model's training step (objective, backward, AdamW) on in-memory batches,
    after two warm-up steps."""
    params = load_params(params_file)
    manifest = read_manifest(shards)
    model = build_model(ModelConfig.build(params.model, params.diffusion, manifest.image_shape,
                                          manifest.num_levels)).train()
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
    parser.add_argument("--image-shape", type=_image_shape, help="C,H,W of synthetic shards (default: digits)")
    parser.add_argument("--num-images", type=int, default=10000, help="images of the synthetic dataset")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per measurement (default: enough for about 1000 batches)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches-per-epoch", type=int, default=None)
    parser.add_argument("--params", default="params.yaml", help="params file whose model the training step uses")
    parser.add_argument("--train-steps", type=int, default=10, help="0 skips the training-step measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            shards = Path(args.shards)
        elif args.image_shape:
            shards = synthetic_shards(Path(tmp), args.image_shape, args.num_images)
        else:
            shards = prepare_dataset(DataParams(), Path(tmp) / "shards") and Path(tmp) / "shards"
        if args.epochs is None:
            per_epoch = args.batches_per_epoch or read_manifest(shards).splits["train"] // args.batch_size
            args.epochs = max(1, round(1000 / max(per_epoch, 1)))
        startup: dict[str, float] = {}
        results = loader_throughput(shards, args.batch_size, args.epochs, batches_per_epoch=args.batches_per_epoch,
                                    rounds=args.rounds, startup=startup)
        step_rate = train_step_throughput(shards, args.params, args.batch_size, args.train_steps) \
            if args.train_steps > 0 else None
        manifest = read_manifest(shards)
    print(f"{manifest.splits['train']} train images of shape {manifest.image_shape}, batch size {args.batch_size}, "
          f"{args.epochs} epochs x {args.rounds} rounds, {torch.get_num_threads()} torch threads")
    print(format_table(results))
    print("seconds to the first batch (not in the rates): "
          + ", ".join(f"{name.removeprefix('TrainLoader, ')} {seconds:.3f}" for name, seconds in startup.items()))
    if step_rate is not None:
        slowest = min(v for k, v in results.items() if k != BASELINE)
        print(f"training step of the default model: {step_rate:.0f} images/s; "
              f"the slowest loader setting is {slowest / step_rate:.1f}x faster than the step")


def _image_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W with C in (1, 3), e.g. 3,32,32; found {text!r}")
    return shape


if __name__ == "__main__":
    main()
