"""Sample quality of a trained model beyond one draw: Frechet distance (and its spread) per sampler
step count, over several sampling seeds and over one large draw.

A Frechet distance over 1,000 samples moves by tens of percent between sampling seeds, so one draw
cannot tell two systems apart. This prints, for each step count of the sampler (ancestral, as the
sample stage, or DDIM with ``--eta``), the mean +- std over ``--seeds`` draws of ``--samples``
images (the size of the train-vs-test floor's train set, so the two are comparable) and the
distance of one ``--large`` draw, beside the floor, in one run.

Usage: python benchmarks/sample_quality.py [--model models/model] [--shards data/shards]
       [--steps 10,25,50] [--sampler ancestral|ddim] [--eta 0] [--seeds 5] [--samples 1000]
       [--large 20000] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ddgm.data import load_split
from ddgm.evaluation import frechet_distance, train_classifier
from ddgm.samplers import sample_levels
from ddgm.serialization import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model", help="model path prefix (as written by the train stage)")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--steps", default="10,25,50", help="comma-separated sampler step counts")
    parser.add_argument("--sampler", default="ancestral", choices=("ancestral", "ddim"))
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM: eta (0 = deterministic)")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds per step count")
    parser.add_argument("--samples", type=int, default=1000, help="samples per seed")
    parser.add_argument("--large", type=int, default=20000, help="size of the one large draw (0 = none)")
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = load_model(args.model).eval()
    k = model.num_levels
    train_x, train_y = load_split(args.shards, "train")
    val_x, val_y = load_split(args.shards, "val")
    test_x, _ = load_split(args.shards, "test")
    classifier = train_classifier(train_x, train_y, k, epochs=args.classifier_epochs, seed=0, val_images=val_x,
                                  val_labels=val_y)
    floor = frechet_distance(classifier, test_x, train_x, k)
    report: dict = {"sampler": args.sampler, "eta": args.eta, "floor_train_vs_test": floor, "steps": {}}
    print(f"sampler {args.sampler}" + (f", eta {args.eta}" if args.sampler == "ddim" else ""))
    print(f"floor (train {len(train_x)} vs test {len(test_x)}): {floor:.2f}")
    print(f"{args.sampler + ' steps':>10}  {'FD mean':>8}  {'std':>6}  {'min':>6}  {'max':>6}  "
          f"{'FD ' + str(args.large) if args.large else 'FD large':>9}  {'ratio to floor':>14}  {'s/1000':>6}")

    def distance(num_samples: int, steps: int, seed: int) -> float:
        levels = sample_levels(model, num_samples, args.sampler, steps, args.eta, seed)
        return frechet_distance(classifier, test_x, levels, k)

    with torch.no_grad():
        for steps in (int(s) for s in args.steps.split(",")):
            start = time.perf_counter()
            draws = [distance(args.samples, steps, seed) for seed in range(args.seeds)]
            seconds = (time.perf_counter() - start) / (args.seeds * args.samples / 1000)
            large = distance(args.large, steps, 10_000) if args.large else None
            row = {"mean": statistics.fmean(draws), "std": statistics.stdev(draws) if len(draws) > 1 else 0.0,
                   "draws": draws, "large": large, "seconds_per_1000": seconds}
            row["ratio_to_floor"] = row["mean"] / floor
            report["steps"][str(steps)] = row
            print(f"{steps:>10}  {row['mean']:>8.2f}  {row['std']:>6.2f}  {min(draws):>6.2f}  {max(draws):>6.2f}  "
                  f"{'-' if large is None else f'{large:.2f}':>9}  {row['ratio_to_floor']:>14.3f}  {seconds:>6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
