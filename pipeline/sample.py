"""DVC stage ``sample``: draw samples from the trained model and draw the article's Figure 2.

Writes samples/samples.safetensors (uint8 levels), samples/grid.png, figures/fig2{a,b,c,d}_*.png
and figures/trajectory.png, and logs them to the pipeline's MLflow run.
Usage: python -m pipeline.sample [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddgm.atomic import atomic_write
from ddgm.data import load_split
from ddgm.figures import save_curve, save_image_grid, save_trajectory
from ddgm.models import DDGM
from ddgm.quantization import levels_to_unit
from ddgm.samplers import sample, sample_levels
from ddgm.serialization import load_model
from ddgm.training.curve import read_curve
from pipeline.common import check_required_tracking, tracker_for_stage
from pipeline.errors import StageInputError
from pipeline.params import SampleParams, load_params
from pipeline.stage import run_stage

GRID_IMAGES = 100
SOURCE = "pipeline/sample.py"  # mlflow.source.name of a run this stage opens
TRAJECTORY_SAMPLES, TRAJECTORY_FRAMES = 6, 10


def draw_samples(model: DDGM, p: SampleParams) -> tuple[torch.Tensor, float]:
    """p.num_samples samples as uint8 levels, in batches, from one seeded generator; and seconds taken."""
    start = time.perf_counter()
    levels = sample_levels(model, p.num_samples, p.sampler, p.num_steps, p.eta, p.seed, p.batch_size, p.clip_denoised)
    return levels, time.perf_counter() - start


def to_display(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """uint8 levels -> floats in [0, 1] for plotting."""
    return levels.float() / (num_levels - 1)


def figures(model: DDGM, p: SampleParams, shards: str, curve_file: str, samples: torch.Tensor) -> list[Path]:
    """Figure 2 A-D of the article and a z_T -> x strip."""
    out, k = Path(p.figures_dir), model.num_levels
    real, _ = load_split(shards, "test")
    real = real[:GRID_IMAGES]
    paths = [save_image_grid(to_display(real, k), out / "fig2a_real.png", "A: real test images"),
             save_image_grid(to_display(samples[:GRID_IMAGES], k), out / "fig2b_samples.png",
                             f"B: samples ({p.sampler}, {p.num_steps or model.num_steps} steps)")]
    generator = torch.Generator().manual_seed(p.seed)
    last = model.diffusion.forward_chain(levels_to_unit(real, k), generator)[-1]
    paths.append(save_image_grid(((last + 1) / 2).clamp(0, 1), out / "fig2c_forward_noise.png",
                                 f"C: z_T of the forward diffusion (T={model.num_steps})"))
    rows = read_curve(Path(curve_file))
    if rows:
        paths.append(save_curve([r["step"] for r in rows], [r["val_bpd"] for r in rows], out / "fig2d_val_curve.png",
                                "D: validation negative ELBO", "bits/dim (val)"))
    strip = sample(model, TRAJECTORY_SAMPLES, p.sampler, p.num_steps, p.eta, generator, p.clip_denoised,
                   keep_trajectory=True).trajectory
    picks = sorted({round(i * (len(strip) - 1) / (TRAJECTORY_FRAMES - 1)) for i in range(TRAJECTORY_FRAMES)})
    frames = [((strip[i] + 1) / 2) for i in picks]
    labels = ["z_T" if i == 0 else ("x" if i == len(strip) - 1 else f"{i}/{len(strip) - 1}") for i in picks]
    paths.append(save_trajectory(frames, labels, out / "trajectory.png", "from z_T to x"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    check_required_tracking(params.tracking)
    p = params.sample
    model = load_model(Path(params.train.model_dir) / "model").eval()
    if p.sampler == "ddim" and model.config.formulation == "article":
        raise StageInputError("sample.sampler='ddim' needs the epsilon formulation; set sample.sampler: ancestral "
                              "for the article's model")
    torch.manual_seed(p.seed)
    samples, seconds = draw_samples(model, p)
    out = Path(p.out_dir)
    tensors = {"images": samples.contiguous()}
    meta = {"num_levels": str(model.num_levels), "sampler": p.sampler, "num_steps": str(p.num_steps), "eta": str(p.eta)}
    atomic_write(out / "samples.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
    grid = save_image_grid(to_display(samples[:GRID_IMAGES], model.num_levels), out / "grid.png", "samples")
    paths = figures(model, p, params.data.out_dir, params.train.curve_file, samples)
    tracker = tracker_for_stage(params.train.model_dir, params.tracking, SOURCE)
    tracker.log_metrics({"sample/seconds": seconds, "sample/images_per_s": len(samples) / seconds}, 0)
    tracker.log_artifacts([grid, *paths], "figures")
    tracker.close()
    print(f"{len(samples)} samples in {seconds:.1f} s ({p.sampler}, {p.num_steps or model.num_steps} steps) -> {out}")


if __name__ == "__main__":
    sys.exit(run_stage(main))
