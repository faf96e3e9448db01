"""DVC stage ``evaluate``: exact bits/dim on val and test, sample quality, sampler comparison.

Writes metrics.json (for ``dvc metrics``), plots/sampler_comparison.tsv (a DVC plot) and
logs everything to the pipeline's MLflow run.
Usage: python -m pipeline.evaluate [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ddgm.atomic import atomic_write
from ddgm.data import load_split
from ddgm.evaluation import (
    FeatureClassifier,
    PixelCategorical,
    accuracy,
    frechet_distance,
    inception_score,
    nearest_neighbour_distance,
    train_classifier,
    uniform_bits_per_dim,
)
from ddgm.models import DDGM
from ddgm.quantization import unit_to_levels
from ddgm.samplers import sample
from ddgm.serialization import load_model
from ddgm.training.validation import split_elbo
from pipeline.common import check_required_tracking, tracker_for_stage
from pipeline.params import PipelineParams, load_params
from pipeline.stage import run_stage

SOURCE = "pipeline/evaluate.py"  # mlflow.source.name of a run this stage opens


def likelihood_metrics(model: DDGM, params: PipelineParams) -> dict[str, float]:
    """Negative ELBO over all T terms for every val and test image, in bits/dim and nats/image, with
    noise the training's checkpoint selection never saw."""
    e, metrics = params.evaluate, {}
    for split in ("val", "test"):
        result = split_elbo(model, params.data.out_dir, split, e.batch_size, e.chunk, e.seed, decoder="discretized",
                            noise="evaluation")
        for term, bpd in result.bits_per_dim().items():
            metrics[f"{split}/{term}_bpd"] = bpd
        metrics[f"{split}/nelbo_nats_per_image"] = result.total
        if model.config.decoder == "continuous":  # the article's own objective, a continuous density
            own = split_elbo(model, params.data.out_dir, split, e.batch_size, e.chunk, e.seed, decoder="continuous",
                             noise="evaluation")
            metrics[f"{split}/continuous_nelbo_nats_per_image"] = own.total
    return metrics


def quality_metrics(samples: torch.Tensor, shards: str, num_levels: int, epochs: int, seed: int,
                    ) -> tuple[dict[str, float], FeatureClassifier, torch.Tensor]:
    """Frechet distance in a digit classifier's feature space (with floor and weak reference), IS,
    classifier accuracy and the nearest-training-image distance of the samples."""
    train_x, train_y = load_split(shards, "train")
    val_x, val_y = load_split(shards, "val")
    test_x, test_y = load_split(shards, "test")
    classifier = train_classifier(train_x, train_y, num_levels, epochs=epochs, seed=seed, val_images=val_x,
                                  val_labels=val_y)
    pixel_model = PixelCategorical.fit(train_x, num_levels)
    pixels = pixel_model.sample(len(samples), torch.Generator().manual_seed(seed))
    metrics = {
        "classifier/test_accuracy": accuracy(classifier, test_x, test_y, num_levels),
        "fd/samples_vs_test": frechet_distance(classifier, test_x, samples, num_levels),
        "fd/floor_train_vs_test": frechet_distance(classifier, test_x, train_x, num_levels),
        "fd/heldout_val_vs_test": frechet_distance(classifier, test_x, val_x, num_levels),
        "fd/pixel_categorical_vs_test": frechet_distance(classifier, test_x, pixels, num_levels),
        "is/samples": inception_score(classifier, samples, num_levels),
        "is/test": inception_score(classifier, test_x, num_levels),
        "nn/samples_to_train": nearest_neighbour_distance(samples, train_x, num_levels),
        "nn/test_to_train": nearest_neighbour_distance(test_x, train_x, num_levels),
        "baseline/pixel_categorical_test_bpd": pixel_model.log_prob_bits_per_dim(test_x),
        "baseline/uniform_bpd": uniform_bits_per_dim(num_levels),
    }
    return metrics, classifier, test_x


def sampler_comparison(model: DDGM, params: PipelineParams, classifier: FeatureClassifier,
                       test_x: torch.Tensor) -> list[dict]:
    """Frechet distance and wall time of the configured fast sampler at several step counts, and of
    the full ancestral sampler over all T levels."""
    e, s = params.evaluate, params.sample
    runs = [(s.sampler, steps) for steps in e.comparison_steps if steps <= model.num_steps]
    if ("ancestral", model.num_steps) not in runs:
        runs.append(("ancestral", model.num_steps))
    rows = []
    for sampler, steps in runs:
        generator = torch.Generator().manual_seed(e.seed)
        start = time.perf_counter()
        out = sample(model, e.comparison_samples, sampler, steps, s.eta, generator, s.clip_denoised)
        seconds = time.perf_counter() - start
        levels = unit_to_levels(out.images, model.num_levels)
        rows.append({"sampler": sampler, "steps": steps, "seconds": seconds,
                     "fd_vs_test": frechet_distance(classifier, test_x, levels, model.num_levels)})
    return rows


def result_line(metrics: dict[str, float]) -> str:
    """The headline result: test bits/dim and the samples' Frechet distance (with its floor)."""
    return (f"test {metrics['test/total_bpd']:.4f} bits/dim, val {metrics['val/total_bpd']:.4f} bits/dim; "
            f"FD samples {metrics['fd/samples_vs_test']:.2f} (floor {metrics['fd/floor_train_vs_test']:.2f}, "
            f"pixel model {metrics['fd/pixel_categorical_vs_test']:.2f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    check_required_tracking(params.tracking)
    torch.manual_seed(params.evaluate.seed)
    model = load_model(Path(params.train.model_dir) / "model").eval()
    samples_path = Path(params.sample.out_dir) / "samples.safetensors"
    if not samples_path.is_file():
        raise FileNotFoundError(f"samples file {samples_path} does not exist (run the sample stage first)")
    samples = load_file(str(samples_path))["images"]
    metrics = likelihood_metrics(model, params)
    quality, classifier, test_x = quality_metrics(samples, params.data.out_dir, model.num_levels,
                                                  params.evaluate.classifier_epochs, params.evaluate.seed)
    metrics.update(quality)
    if model.config.formulation == "epsilon" or params.sample.sampler == "ancestral":
        rows = sampler_comparison(model, params, classifier, test_x)
        table = ["sampler\tsteps\tseconds\tfd_vs_test"] + [
            f"{r['sampler']}\t{r['steps']}\t{r['seconds']:.3f}\t{r['fd_vs_test']:.4f}" for r in rows]
        path = Path(params.evaluate.comparison_file)
        atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(table) + "\n"))
        for r in rows:
            metrics[f"sampler/{r['sampler']}_{r['steps']}_fd"] = r["fd_vs_test"]
            metrics[f"sampler/{r['sampler']}_{r['steps']}_seconds"] = r["seconds"]
    metrics = {k: round(float(v), 6) for k, v in metrics.items()}
    text = json.dumps(metrics, indent=2, sort_keys=True)
    atomic_write(params.evaluate.metrics_file, lambda tmp: Path(tmp).write_text(text + "\n"))
    tracker = tracker_for_stage(params.train.model_dir, params.tracking, SOURCE)
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, 0)
    tracker.note("Result", result_line(metrics))
    tracker.log_artifacts([params.evaluate.metrics_file, params.evaluate.comparison_file], "evaluation")
    tracker.close()
    print(result_line(metrics))


if __name__ == "__main__":
    sys.exit(run_stage(main))
