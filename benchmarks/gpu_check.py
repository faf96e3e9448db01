"""One-call accelerator check: correctness on the device, then throughput and memory, into one JSON file.

Usage: python benchmarks/gpu_check.py --device {cuda,cpu} [--quick] [--smoke] --out report.json
           [--params params.yaml] [--preset presets/cifar10-32.yaml] [--only SECTION,...] [--time-budget 420]

Needs nothing but the repository and its environment (every dataset is made in a temporary directory);
where ddgm is not installed, run it from the repository root with PYTHONPATH=. set.
Sections, in order (each is written to --out, atomically, as soon as it ends; one that raises is
recorded with its error and the next one runs):

  environment       torch, CUDA and cuDNN versions, device name and memory, CPU count, git commit
  bits_per_dim      the fixed model (params.yaml's digits model, seeded, 200 training steps on the CPU):
                    the exact -ELBO in bits/dim over all T terms of one fixed test batch, with the same
                    z_t noise, on the CPU and on the device in float32 with TF32 off; passes at a relative
                    difference of the batch mean <= 1e-4 (the CPU figure is also checked against
                    ddgm.likelihood.elbo_terms)
  bf16_step         one training step of the fixed model under torch.autocast(bfloat16): finite loss and
                    gradients (its loss beside fp32's for the same t and noise); and one fp32 step with
                    a generator on the device, as ddgm.training.loop passes it
  seeded_sampling   the same seed twice on the device gives identical samples (ancestral over all T levels,
                    and params.yaml's sampler); another seed gives different ones
  loader            TrainLoader images/s with 0/4/8 workers (--quick: 0/1/2) on synthetic 3x32x32 uint8
                    shards written by ddgm.data.prepare_dataset, beside an in-memory DataLoader, and the
                    seconds to the first batch (benchmarks/loader.py's measurement, alternating rounds)
  train_throughput  images/s of a training step (model + objective + clipping + optimizer, on an in-memory
                    batch) of the 32x32 preset: fp32, fp32 with TF32 (CUDA only), bf16 autocast, and
                    fp32 / bf16 under torch.compile, measured in alternating rounds; device memory per variant
  peak_memory       the process's peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS)

--quick shrinks every workload to a dry run (on the CPU it also skips torch.compile, which takes minutes
there); --smoke shrinks them further and the preset's U-Net too (for the test suite: its figures mean
nothing). A variant or section that would start after --time-budget seconds is skipped, with the reason.
Exit status: 0 when every section ran and every check passed, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ddgm.atomic import atomic_write
from ddgm.config import ModelConfig
from ddgm.data import DataParams, load_split, prepare_dataset
from ddgm.likelihood import ELBOTerms, elbo_terms, nats_to_bits_per_dim
from ddgm.models import DDGM, build_model
from ddgm.objectives import ObjectiveOutput, compute_objective
from ddgm.quantization import levels_to_unit
from ddgm.samplers import sample
from ddgm.timestep_sampler import UniformSampler, make_timestep_sampler
from pipeline.params import PipelineParams, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]
REPORT_FORMAT = "ddgm-gpu-check/1"
TOLERANCE = 1e-4  # relative CPU vs device difference of the bits/dim (float32)
PRESET_IMAGE_SHAPE, PRESET_LEVELS = (3, 32, 32), 256  # the 32x32 preset's data: 8-bit colour images
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Scale:
    """How much work each section does."""

    fixed_train_steps: int  # CPU training steps of the fixed model before the checks
    bpd_batch: int  # test images in the bits/dim comparison
    samples: int  # images per sampling run
    loader_images: int  # synthetic 3x32x32 images written as shards
    loader_workers: tuple[int, ...]
    loader_epochs: int
    loader_batch: int
    train_batch: int | None  # None: the preset's train.batch_size
    warmup_steps: int  # per variant, before the timed rounds (includes compilation)
    rounds: int  # alternating rounds over the variants
    steps_per_round: int
    shrink_preset: bool  # a tiny U-Net instead of the preset's (--smoke)


SCALES = {
    "full": Scale(200, 64, 64, 10000, (0, 4, 8), 3, 128, None, 3, 3, 10, False),
    "quick": Scale(20, 32, 16, 2000, (0, 1, 2), 2, 64, 4, 1, 2, 1, False),
    "smoke": Scale(2, 4, 4, 300, (0, 1), 1, 32, 2, 1, 2, 1, True),
}


@dataclasses.dataclass
class FixedModel:
    """The model of the correctness checks, its params and one fixed batch of test images (CPU)."""

    params: PipelineParams
    model: DDGM
    batch: torch.Tensor
    train_steps: int
    last_loss: float


class Context:
    """What the sections share: the device, the workload scale, the inputs, a scratch directory and the clock."""

    def __init__(self, args: argparse.Namespace, workdir: Path, save: Callable[[], None]) -> None:
        self.device = torch.device(args.device)
        self.scale = SCALES["smoke" if args.smoke else "quick" if args.quick else "full"]
        self.compile_skip = None
        if self.device.type == "cpu" and (args.quick or args.smoke):
            self.compile_skip = ("torch.compile of the preset takes minutes on a CPU; --quick skips it "
                                 "(it runs with --device cuda, and on the CPU without --quick)")
        self.params_file, self.preset_file = args.params, args.preset
        self.workdir, self.save = workdir, save
        self.started, self.budget_s = time.perf_counter(), args.time_budget
        self.peak_device_bytes = 0  # the largest torch.cuda.max_memory_allocated seen before any reset

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self, reserve_s: float = 0.0) -> str | None:
        """A skip reason when less than ``reserve_s`` seconds of the time budget are left, else None."""
        if self.elapsed() + reserve_s > self.budget_s:
            return f"time budget: {self.elapsed():.0f} s of {self.budget_s:.0f} s spent (needs ~{reserve_s:.0f} s more)"
        return None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> int:
        """Start a new peak-memory window; return the bytes allocated now (CUDA; 0 elsewhere)."""
        if self.device.type != "cuda":
            return 0
        self.synchronize()
        self.peak_device_bytes = max(self.peak_device_bytes, torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    @functools.cached_property
    def fixed(self) -> FixedModel:
        return build_fixed_model(self.params_file, self.workdir / "digits", self.scale)


# --------------------------------------------------------------------------- shared pieces


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on or off, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def train_step(model: DDGM, optimizer: torch.optim.Optimizer, sampler: UniformSampler, params: PipelineParams,
               x: torch.Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> ObjectiveOutput:
    """One optimizer step as ddgm.training.loop takes it (objective, backward, timestep-sampler update,
    gradient clipping, optimizer), under autocast to ``dtype`` when given. Returns the objective's output."""
    t = params.train
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = compute_objective(t.objective, model, x, sampler, generator, t.vlb_weight)
    out.loss.mean().backward()
    if out.terms is not None:
        sampler.update(out.t, out.terms.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf)
    optimizer.step()
    return out


def make_optimizer(params: PipelineParams, model: DDGM) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if params.train.optimizer == "adamw" else torch.optim.Adamax
    return kind(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)


def build_fixed_model(params_file: Path, shards: Path, scale: Scale) -> FixedModel:
    """params.yaml's model on the bundled digits, seeded, after a few CPU training steps (so that no
    layer is still at its zero initialisation), in eval mode; with the first test images as the batch."""
    params = load_params(params_file)
    manifest = prepare_dataset(DataParams(), shards)
    torch.manual_seed(params.train.seed)
    model = build_model(ModelConfig.build(params.model, params.diffusion, manifest.image_shape,
                                          manifest.num_levels)).train()
    optimizer = make_optimizer(params, model)
    sampler = make_timestep_sampler(params.train.timestep_sampler, model.num_steps)
    train_images = levels_to_unit(load_split(shards, "train")[0], manifest.num_levels)
    generator = torch.Generator().manual_seed(params.train.seed)
    loss = math.nan
    for _ in range(scale.fixed_train_steps):
        index = torch.randint(len(train_images), (params.train.batch_size,), generator=generator)
        loss = train_step(model, optimizer, sampler, params, train_images[index], generator).loss.mean().item()
        optimizer.zero_grad(set_to_none=True)
    batch = levels_to_unit(load_split(shards, "test")[0][: scale.bpd_batch], manifest.num_levels)
    return FixedModel(params, model.eval(), batch, scale.fixed_train_steps, loss)


def level_noise(x: torch.Tensor, num_steps: int, chunk: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The noise ddgm.likelihood.elbo_terms draws for levels 1..T in chunks of ``chunk`` levels,
    drawn in the same order from ``generator``: chunk i is [(levels in it) * B, C, H, W]."""
    return [torch.randn((min(chunk, num_steps + 1 - start) * x.shape[0], *x.shape[1:]), generator=generator)
            for start in range(1, num_steps + 1, chunk)]


@torch.no_grad()
def elbo_terms_with_noise(model: DDGM, x: torch.Tensor, noise: list[torch.Tensor], chunk: int) -> ELBOTerms:
    """ddgm.likelihood.elbo_terms with its noise given (moved to x's device), so that two devices
    evaluate every L_{t-1} at the same z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps."""
    batch, steps = x.shape[0], model.num_steps
    levels = torch.empty(batch, steps, device=x.device)
    for start, eps in zip(range(1, steps + 1, chunk), noise, strict=True):
        stop = min(start + chunk, steps + 1)
        t = torch.arange(start, stop, device=x.device).repeat_interleave(batch)
        x_rep = x.repeat(stop - start, 1, 1, 1)
        terms = model.loss_terms(x_rep, model.diffusion.q_sample(x_rep, t, eps.to(x.device)), t)
        levels[:, start - 1 : stop - 1] = terms.view(stop - start, batch).T
    return ELBOTerms(model.diffusion.prior_kl(x), levels)


def bits_per_dim(terms: ELBOTerms, x: torch.Tensor) -> torch.Tensor:
    """Per-image bits/dim of the negative ELBO, as float64 on the CPU."""
    return nats_to_bits_per_dim(terms.total.double().cpu(), x[0].numel())


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """max |a - b| / |b| (elementwise, then the largest)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs()).max())


def gradients_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- correctness sections


def section_environment(ctx: Context, out: dict) -> None:
    out.update(python=platform.python_version(), torch=torch.__version__, cuda_build=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), device=str(ctx.device), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), platform=platform.platform(), git_commit=_git_commit(),
               default_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
               default_tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark,
               scale=dataclasses.asdict(ctx.scale), time_budget_s=ctx.budget_s)
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   device_memory_gib=props.total_memory / GIB, device_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        out.update(device_name=platform.processor() or platform.machine())


def _git_commit() -> str | None:
    """HEAD of the repository, or None where there is no git or no repository (a copied working tree)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def section_bits_per_dim(ctx: Context, out: dict) -> None:
    fixed = ctx.fixed
    model, x, chunk = fixed.model, fixed.batch, fixed.params.train.val_chunk
    seed = fixed.params.evaluate.seed
    noise = level_noise(x, model.num_steps, chunk, torch.Generator().manual_seed(seed))
    cpu_terms = elbo_terms_with_noise(model, x, noise, chunk)
    library = elbo_terms(model, x, chunk, torch.Generator().manual_seed(seed))
    device_model = copy.deepcopy(model).to(ctx.device)
    with tf32(False):
        device_terms = elbo_terms_with_noise(device_model, x.to(ctx.device), noise, chunk)
    cpu_bpd, device_bpd = bits_per_dim(cpu_terms, x), bits_per_dim(device_terms, x)
    rel_mean = relative(device_bpd.mean(), cpu_bpd.mean())
    out.update(model=f"{fixed.params.model.formulation}/{fixed.params.model.network}", num_steps=model.num_steps,
               train_steps=fixed.train_steps, last_train_loss=fixed.last_loss, batch=len(x), tf32=False,
               cpu_bits_per_dim=float(cpu_bpd.mean()), device_bits_per_dim=float(device_bpd.mean()),
               relative_difference=rel_mean, max_image_relative_difference=relative(device_bpd, cpu_bpd),
               matches_library_elbo_terms=relative(bits_per_dim(library, x), cpu_bpd) <= 1e-6,
               tolerance=TOLERANCE)
    out["passed"] = bool(rel_mean <= TOLERANCE and out["matches_library_elbo_terms"])


def section_bf16_step(ctx: Context, out: dict) -> None:
    fixed = ctx.fixed
    params, x = fixed.params, fixed.batch.to(ctx.device)
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(fixed.model).to(ctx.device).train()
        sampler = make_timestep_sampler(params.train.timestep_sampler, model.num_steps)
        torch.manual_seed(params.train.seed)  # the same t, noise and dropout for both
        result = train_step(model, make_optimizer(params, model), sampler, params, x, dtype=dtype)
        losses[name] = result.loss.mean().item()
        out[f"{name}_loss"] = losses[name]
        out[f"{name}_loss_finite"] = math.isfinite(losses[name])
        out[f"{name}_grads_finite"] = gradients_finite(model)
        out[f"{name}_params_finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    out["bf16_vs_fp32_loss_relative_difference"] = relative(losses["bf16"], losses["fp32"])
    out["objective"] = params.train.objective
    out["device_generator_step"] = _device_generator_step(ctx, fixed)
    out["passed"] = bool(all(out[f"bf16_{k}_finite"] for k in ("loss", "grads", "params"))
                         and out["device_generator_step"] == "ok")


def _device_generator_step(ctx: Context, fixed: FixedModel) -> str:
    """'ok', or the error of one fp32 step whose t and noise come from a torch.Generator on the device,
    the way ddgm.training.loop draws them."""
    model = copy.deepcopy(fixed.model).to(ctx.device).train()
    sampler = make_timestep_sampler(fixed.params.train.timestep_sampler, model.num_steps)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    try:
        train_step(model, make_optimizer(fixed.params, model), sampler, fixed.params,
                   fixed.batch.to(ctx.device), generator)
    except RuntimeError as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def section_seeded_sampling(ctx: Context, out: dict) -> None:
    fixed = ctx.fixed
    model, s = copy.deepcopy(fixed.model).to(ctx.device).eval(), fixed.params.sample
    runs = {"ancestral": ("ancestral", None), f"{s.sampler}_{s.num_steps or 'all'}": (s.sampler, s.num_steps)}
    passed = True
    for name, (sampler, steps) in runs.items():
        first, second, other = (_draw(ctx, model, sampler, steps, seed) for seed in (s.seed, s.seed, s.seed + 1))
        record = {"identical": torch.equal(first, second), "max_abs_difference": float((first - second).abs().max()),
                  "other_seed_differs": not torch.equal(first, other), "finite": bool(torch.isfinite(first).all())}
        out[name] = record
        passed = passed and all(record[k] for k in ("identical", "other_seed_differs", "finite"))
    out.update(samples=ctx.scale.samples, seed=s.seed, passed=passed)


def _draw(ctx: Context, model: DDGM, sampler: str, steps: int | None, seed: int) -> torch.Tensor:
    """Samples (on the CPU) drawn on the device from a device generator seeded with ``seed``."""
    s = ctx.fixed.params.sample
    generator = torch.Generator(device=ctx.device).manual_seed(seed)
    return sample(model, ctx.scale.samples, sampler, steps, s.eta, generator, s.clip_denoised).images.cpu()


# --------------------------------------------------------------------------- throughput sections


def section_loader(ctx: Context, out: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loader import BASELINE, loader_throughput, synthetic_shards

    scale, startup = ctx.scale, {}
    (ctx.workdir / "synthetic").mkdir()
    shards = synthetic_shards(ctx.workdir / "synthetic", PRESET_IMAGE_SHAPE, scale.loader_images)
    rates = loader_throughput(shards, batch_size=scale.loader_batch, epochs=scale.loader_epochs,
                              workers=scale.loader_workers, rounds=scale.rounds, startup=startup)
    names = {str(n): f"TrainLoader, {n} workers" for n in scale.loader_workers}
    out.update(image_shape=list(PRESET_IMAGE_SHAPE), images=scale.loader_images, batch_size=scale.loader_batch,
               epochs=scale.loader_epochs, rounds=scale.rounds, in_memory_images_per_s=rates[BASELINE],
               images_per_s={n: rates[name] for n, name in names.items()},
               seconds_to_first_batch={n: startup[name] for n, name in names.items()})


VARIANTS = {  # name: (autocast dtype, TF32, torch.compile)
    "fp32": (None, False, False),
    "fp32_tf32": (None, True, False),
    "bf16": (torch.bfloat16, False, False),
    "fp32_compile": (None, False, True),
    "bf16_compile": (torch.bfloat16, False, True),
}


def preset_params(ctx: Context) -> PipelineParams:
    """The params file with the preset's keys set; with --smoke its U-Net made tiny (8 base channels, one
    block per level)."""
    params = load_params(ctx.params_file, ctx.preset_file)
    if not ctx.scale.shrink_preset:
        return params
    values = dataclasses.asdict(params)
    values["model"].update(base_channels=8, num_res_blocks=1, norm_groups=8)
    return params_from_dict(values)


class Variant:
    """One way of running the training step: its own seeded model and optimizer, timings and memory."""

    def __init__(self, ctx: Context, params: PipelineParams, x: torch.Tensor, name: str) -> None:
        self.ctx, self.params, self.x, self.name = ctx, params, x, name
        self.dtype, self.tf32, compiled = VARIANTS[name]
        torch.manual_seed(params.train.seed)
        config = ModelConfig.build(params.model, params.diffusion, PRESET_IMAGE_SHAPE, PRESET_LEVELS)
        self.model = build_model(config).to(ctx.device).train()
        if compiled:
            self.model.network = torch.compile(self.model.network)
        self.optimizer = make_optimizer(params, self.model)
        self.sampler = make_timestep_sampler(params.train.timestep_sampler, self.model.num_steps)
        self.seconds, self.steps, self.transient_bytes, self.losses = 0.0, 0, 0, []

    def run(self, steps: int) -> float:
        """Take ``steps`` steps; their wall time in seconds (device synchronised)."""
        with tf32(self.tf32):
            self.ctx.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                out = train_step(self.model, self.optimizer, self.sampler, self.params, self.x, dtype=self.dtype)
                self.optimizer.zero_grad(set_to_none=True)
                self.losses.append(out.loss.detach().mean())
            self.ctx.synchronize()
        return time.perf_counter() - start

    def timed_round(self, steps: int) -> None:
        base = self.ctx.reset_peak_memory()
        self.seconds += self.run(steps)
        self.steps += steps
        if self.ctx.device.type == "cuda":
            self.transient_bytes = max(self.transient_bytes, torch.cuda.max_memory_allocated(self.ctx.device) - base)

    def record(self) -> dict:
        resident = sum(p.numel() * p.element_size() for p in self.model.parameters())
        resident += sum(v.numel() * v.element_size() for state in self.optimizer.state.values()
                        for v in state.values() if torch.is_tensor(v))
        record = {"status": "ok", "images_per_s": self.steps * len(self.x) / self.seconds, "timed_steps": self.steps,
                  "seconds_per_step": self.seconds / self.steps,
                  "losses_finite": bool(torch.isfinite(torch.stack(self.losses)).all()),
                  "resident_gib": resident / GIB}
        if self.ctx.device.type == "cuda":
            record["step_memory_gib"] = self.transient_bytes / GIB  # activations, gradients, workspace
            record["peak_memory_gib"] = (resident + self.transient_bytes) / GIB
        return record


def _variant_skip(ctx: Context, name: str) -> str | None:
    _, use_tf32, compiled = VARIANTS[name]
    if use_tf32 and ctx.device.type != "cuda":
        return "TF32 is a CUDA setting"
    if compiled and ctx.compile_skip:
        return ctx.compile_skip
    return ctx.over_budget(150.0 if compiled else 20.0)


def _warm_up(ctx: Context, params: PipelineParams, x: torch.Tensor, name: str, out: dict) -> Variant | None:
    """Build a variant and take its warm-up steps (compilation happens here); None if it failed."""
    try:
        variant = Variant(ctx, params, x, name)
        first = variant.run(1)
        rest = variant.run(ctx.scale.warmup_steps - 1) if ctx.scale.warmup_steps > 1 else 0.0
    except Exception as error:  # recorded; the other variants still run
        out[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc(limit=8)}
        _free_device_memory(ctx)
        return None
    out[name] = {"status": "warm", "first_step_s": first, "warmup_s": first + rest}
    return variant


def _free_device_memory(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def section_train_throughput(ctx: Context, out: dict) -> None:
    params = preset_params(ctx)
    batch = ctx.scale.train_batch or params.train.batch_size
    m = params.model
    out.update(preset=str(ctx.preset_file), shrunk_for_smoke=ctx.scale.shrink_preset, batch_size=batch,
               model=f"{m.formulation}/{m.network} base {m.base_channels} mults {list(m.channel_mults)} "
                     f"blocks {m.num_res_blocks} variance {m.variance}",
               objective=params.train.objective, optimizer=params.train.optimizer, rng="global (torch.manual_seed)",
               warmup_steps=ctx.scale.warmup_steps, rounds=ctx.scale.rounds, steps_per_round=ctx.scale.steps_per_round)
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(PRESET_LEVELS, (batch, *PRESET_IMAGE_SHAPE), generator=generator)
    x = levels_to_unit(levels, PRESET_LEVELS).to(ctx.device)
    variants, records = {}, out.setdefault("variants", {})
    for name in VARIANTS:
        reason = _variant_skip(ctx, name)
        if reason:
            records[name] = {"status": "skipped", "reason": reason}
        elif (variant := _warm_up(ctx, params, x, name, records)) is not None:
            variants[name] = variant
            out["parameters"] = sum(p.numel() for p in variant.model.parameters())
        ctx.save()
    for _ in range(ctx.scale.rounds):
        _timed_round(ctx, variants, records)
        ctx.save()
        if ctx.over_budget():
            break
    _speedups(records)


def _timed_round(ctx: Context, variants: dict[str, Variant], records: dict) -> None:
    """One round of timed steps of every variant, in turn; a variant that fails is recorded and dropped."""
    for name, variant in list(variants.items()):
        try:
            variant.timed_round(ctx.scale.steps_per_round)
        except Exception as error:  # recorded; the other variants still run
            records[name].update(status="failed", error=f"{type(error).__name__}: {error}",
                                 traceback=traceback.format_exc(limit=8))
            del variants[name]
            _free_device_memory(ctx)
            continue
        records[name].update(variant.record())


def _speedups(records: dict) -> None:
    """Each measured variant's images/s as a multiple of fp32's (measured in the same rounds)."""
    base = records.get("fp32", {}).get("images_per_s")
    for record in records.values():
        if base and "images_per_s" in record:
            record["vs_fp32"] = record["images_per_s"] / base


def section_peak_memory(ctx: Context, out: dict) -> None:
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
    if ctx.device.type == "cuda":
        ctx.reset_peak_memory()
        out.update(max_memory_allocated_gib=ctx.peak_device_bytes / GIB,
                   max_memory_reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / GIB)


SECTIONS: dict[str, Callable[[Context, dict], None]] = {
    "environment": section_environment,
    "bits_per_dim": section_bits_per_dim,
    "bf16_step": section_bf16_step,
    "seeded_sampling": section_seeded_sampling,
    "loader": section_loader,
    "train_throughput": section_train_throughput,
    "peak_memory": section_peak_memory,
}
ALWAYS_RUN = ("environment", "peak_memory")  # cheap; run even when the time budget is spent


# --------------------------------------------------------------------------- report and driver


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    """Non-finite floats as strings ('nan', 'inf'), so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Report:
    """The JSON report, rewritten atomically (temp file + rename) every time ``save`` is called."""

    def __init__(self, path: Path, args: argparse.Namespace, argv: list[str]) -> None:
        self.path = path
        self.data = {"format": REPORT_FORMAT, "status": "running", "device": args.device, "quick": args.quick,
                     "smoke": args.smoke, "argv": argv, "started_utc": _utc_now(), "sections": {}}
        self.started = time.perf_counter()

    def save(self) -> None:
        self.data.update(updated_utc=_utc_now(), elapsed_s=time.perf_counter() - self.started)
        text = json.dumps(_jsonable(self.data), indent=2) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def run_section(ctx: Context, report: Report, name: str, section: Callable[[Context, dict], None]) -> None:
    """Run one section into its record; an exception is recorded (with what it had filled in) and swallowed."""
    out = report.data["sections"][name] = {"status": "running"}
    reason = None if name in ALWAYS_RUN else ctx.over_budget()
    if reason:
        out.update(status="skipped", reason=reason)
        report.save()
        return
    report.save()
    print(f"[{ctx.elapsed():6.0f} s] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        section(ctx, out)
        out["status"] = "ok"
    except Exception as error:  # recorded in the report; the next section still runs
        out.update(status="failed", error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc(limit=12))
        print(f"  {name} failed: {out['error']}", file=sys.stderr, flush=True)
        _free_device_memory(ctx)
    out["seconds"] = time.perf_counter() - start
    report.save()


def _fmt(value, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def summary(report: dict) -> str:
    """A few human-readable lines of the report's figures."""
    sections = report["sections"]
    lines = [f"accelerator check on {report['device']} ({report['status']}, {report['elapsed_s']:.0f} s)"]
    for name, record in sections.items():
        status = record["status"] if "passed" not in record else ("PASS" if record["passed"] else "FAIL")
        detail = record.get("error") or record.get("reason") or ""
        if name == "bits_per_dim" and "relative_difference" in record:
            detail = (f"cpu {record['cpu_bits_per_dim']:.6f} vs device {record['device_bits_per_dim']:.6f} bits/dim,"
                      f" relative difference {record['relative_difference']:.2e} (tolerance {TOLERANCE:g})")
        elif name == "bf16_step" and "bf16_loss" in record:
            detail = (f"bf16 loss {_fmt(record['bf16_loss'])} (fp32 {_fmt(record['fp32_loss'])}), grads finite "
                      f"{record['bf16_grads_finite']}; device-generator step: {record['device_generator_step']}")
        elif name == "seeded_sampling" and "passed" in record:
            detail = ", ".join(f"{k}: identical {v['identical']}" for k, v in record.items() if isinstance(v, dict))
        elif name == "loader" and "images_per_s" in record:
            detail = ", ".join(f"{n} workers {v:.0f}" for n, v in record["images_per_s"].items())
            detail += f" images/s (in-memory {record['in_memory_images_per_s']:.0f})"
        elif name == "peak_memory":
            detail = ", ".join(f"{k} {v:.2f}" for k, v in record.items() if k.endswith("_gib"))
        lines.append(f"  {name:<17} {status:<8} {detail}")
        if name == "train_throughput":
            lines += _throughput_lines(record)
    return "\n".join(lines)


def _throughput_lines(record: dict) -> list[str]:
    lines = [(f"    {record.get('model', '')}, batch {record.get('batch_size', '?')}, "
              f"{record.get('parameters', '?')} parameters")]
    for name, variant in record.get("variants", {}).items():
        if "images_per_s" in variant:
            memory = f", peak {variant['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in variant else ""
            failed = f" (then failed: {variant['error']})" if variant["status"] == "failed" else ""
            ratio, first = _fmt(variant.get("vs_fp32"), ".2f"), _fmt(variant.get("first_step_s"), ".1f")
            lines.append(f"    {name:<13} {variant['images_per_s']:10.1f} images/s  x{ratio} vs fp32, "
                         f"first step {first} s{memory}{failed}")
        else:
            lines.append(f"    {name:<13} {variant['status']}: {variant.get('error') or variant.get('reason')}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the JSON report (rewritten after every section)")
    parser.add_argument("--quick", action="store_true", help="small workloads (a dry run); on CPU no torch.compile")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads and a tiny U-Net (for tests)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="the fixed (digits) model's params")
    parser.add_argument("--preset", type=Path, default=ROOT / "presets/cifar10-32.yaml", help="the 32x32 preset")
    parser.add_argument("--only", help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds after which no further section or variant starts")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, "
                     f"CUDA build {torch.version.cuda})")
    args.sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sections into the report; 0 when every section ran and every check passed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = Report(args.out, args, argv)
    with tempfile.TemporaryDirectory(prefix="ddgm-gpu-check-") as tmp:
        ctx = Context(args, Path(tmp), report.save)
        for name in args.sections:
            run_section(ctx, report, name, SECTIONS[name])
    report.data["status"] = "complete"
    report.save()
    print(summary(report.data))
    print(f"report: {args.out}")
    records = report.data["sections"].values()
    return 0 if all(r["status"] == "ok" and r.get("passed", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
