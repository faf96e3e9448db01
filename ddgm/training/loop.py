"""The training loop: Accelerate for processes, mixed precision and gradient accumulation;
the shard loader for data; EMA weights; validation on the exact ELBO; resumable checkpoints.

The same code runs as one CPU process or under ``accelerate launch`` / ``torchrun`` on many
GPUs and machines. Only the main process writes model files and talks to the tracker.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from ema_pytorch import EMA
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ddgm.config import ModelConfig
from ddgm.data import TrainLoader, manifest_hash, read_manifest, verify_once
from ddgm.data.lineage import dataset_input
from ddgm.data.location import local_dir
from ddgm.models import DDGM, build_model
from ddgm.objectives import ObjectiveOutput, compute_objective
from ddgm.atomic import atomic_write
from ddgm.serialization import save_model
from ddgm.timestep_sampler import UniformSampler, make_timestep_sampler
from ddgm.training import checkpoint as ckpt
from ddgm.training.acceleration import batch_to_device, compile_networks, configure_backends, make_optimizer
from ddgm.params import PipelineParams, TrainParams, check_batch_layout, model_config
from ddgm.training.progress import validation_grid
from ddgm.training.tracking import Tracker
from ddgm.training.validation import split_elbo

BEST_WEIGHTS = "best.safetensors"
CURVE_COLUMNS = ("step", "val_bpd", "prior_bpd", "diffusion_bpd", "decoder_bpd")
# Parameters that may change between a run and its resumption without invalidating it.
RESUMABLE_CHANGES = {"max_steps", "patience", "val_every", "checkpoint_every", "keep_checkpoints", "log_every", "resume"}


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was written and the job should be requeued."""

    exit_code = 75  # EX_TEMPFAIL


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; the last checkpoint is left as it was."""


class ObjectiveModule(nn.Module):
    """Wraps a DDGM so that DDP sees the objective as ``forward`` (gradient sync hooks fire)."""

    def __init__(self, model: DDGM, objective: str, sampler: UniformSampler, vlb_weight: float):
        super().__init__()
        self.model, self.objective, self.sampler, self.vlb_weight = model, objective, sampler, vlb_weight

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> ObjectiveOutput:
        return compute_objective(self.objective, self.model, x, self.sampler, generator, self.vlb_weight)


@dataclass
class TrainResult:
    step: int
    best_step: int
    best_val_bpd: float
    stopped_early: bool
    run_id: str | None


class StopSignal:
    """Remembers that SIGTERM/SIGUSR1 arrived; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = True


def code_hash() -> str:
    """sha256 over the source of the ddgm package (paths and contents)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(params: PipelineParams, config: ModelConfig, data_hash: str) -> str:
    """Hash of everything that makes a checkpoint belong to this run: the model config, the
    training params (but those in RESUMABLE_CHANGES), the data manifest and the library code."""
    train = {k: v for k, v in asdict(params.train).items() if k not in RESUMABLE_CHANGES}
    record = {"model": config.to_dict(), "train": train, "data": data_hash, "code": code_hash()}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lr_lambda(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant, cosine or linear decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def _write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    lines = ["\t".join(CURVE_COLUMNS)] + ["\t".join(f"{row[c]:.6g}" for c in CURVE_COLUMNS) for row in rows]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def read_curve(path: Path) -> list[dict[str, float]]:
    """Rows of a validation curve file (empty when it does not exist)."""
    if not path.is_file():
        return []
    header, *lines = path.read_text().splitlines()
    names = header.split("\t")
    return [dict(zip(names, map(float, line.split("\t")))) for line in lines if line]


@dataclass
class TrainingStep:
    """Everything one optimizer step touches, and the step itself (``train`` runs it; so does
    benchmarks/train_throughput.py, to time it without the loader, logging and checkpoints)."""

    accelerator: Accelerator
    objective: nn.Module  # the prepared ObjectiveModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: UniformSampler
    ema: EMA
    generator: torch.Generator
    train: TrainParams

    def __call__(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One micro-step on the batch ``x`` (already on the device) towards optimizer step ``step``:
        loss, backward, importance-sampler update, then on the last micro-step clipping, the
        optimizer and scheduler steps and the EMA update. The mean loss and the gradient norm
        (None on accumulation micro-steps); NonFiniteLoss before any weight changes."""
        accelerator, t = self.accelerator, self.train
        with accelerator.accumulate(self.objective):
            out = self.objective(x, self.generator)
            loss = out.loss.mean()
            if not bool(accelerator.gather(torch.isfinite(loss.detach())[None]).all()):
                raise NonFiniteLoss(f"non-finite loss at step {step}; the last checkpoint is kept")
            accelerator.backward(loss)
            if out.terms is not None and t.timestep_sampler == "importance":
                self.sampler.update(accelerator.gather(out.t), accelerator.gather(out.terms.detach()))
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(self.objective.parameters(), t.grad_clip or math.inf)
            self.optimizer.step()  # a no-op on accumulation micro-steps, as is zero_grad
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            self.ema.update()
        return loss.detach(), grad_norm


def build_training_step(params: PipelineParams, config: ModelConfig, accelerator: Accelerator) -> TrainingStep:
    """Model (seeded by train.seed), its EMA copy, timestep sampler, objective, optimizer and
    learning-rate schedule, prepared by ``accelerator`` with the speed settings of ``params.train``."""
    t = params.train
    torch.manual_seed(t.seed)
    model = build_model(config)
    # the EMA copy is taken first: it stays float32, uncompiled and contiguous for validation
    ema = EMA(model, beta=t.ema_decay, update_after_step=0, update_every=1, include_online_model=False,
              use_foreach=True)
    configure_backends(t, accelerator.device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if t.compile:
        compile_networks(model, t.compile_mode)
    sampler = make_timestep_sampler(t.timestep_sampler, config.schedule.num_steps)
    objective = ObjectiveModule(model, t.objective, sampler, t.vlb_weight)
    optimizer = make_optimizer(t, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.lr_decay, t.min_lr_ratio))
    objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    ema.to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed * 100003 + accelerator.process_index)
    return TrainingStep(accelerator, objective, optimizer, scheduler, sampler, ema, generator, t)


def train(
    params: PipelineParams,
    accelerator: Accelerator | None = None,
    make_tracker: Callable[[str | None], Tracker] | None = None,
    stop: StopSignal | None = None,
) -> TrainResult:
    """Train the model that ``params`` describe on the shards it names; see the module doc.

    ``make_tracker(run_id)`` opens the tracking run (``run_id`` is the resumed run's, or None);
    it is called on the main process only.
    """
    t = params.train
    shards = os.environ.get("DDGM_SHARDS") or t.shards
    checkpoint_dir = Path(os.environ.get("DDGM_CHECKPOINT_DIR") or t.checkpoint_dir)
    model_dir, curve_path = Path(t.model_dir), Path(t.curve_file)
    stop = stop or StopSignal()

    # everything that can be checked cheaply is checked before any shard is read
    manifest = read_manifest(shards)
    config = model_config(params, manifest.image_shape, manifest.num_levels)
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=config.formulation == "article")]
    owns_accelerator = accelerator is None
    accelerator = accelerator or Accelerator(
        gradient_accumulation_steps=t.grad_accum, mixed_precision=t.mixed_precision,
        step_scheduler_with_optimizer=False, kwargs_handlers=kwargs,
    )
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_world != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched_world} processes but Accelerate sees {accelerator.num_processes}; "
            "on a machine without GPUs set ACCELERATE_USE_CPU=true (see infra/README.md)")
    micro_batch = check_batch_layout(t, accelerator.num_processes)
    rank, world = accelerator.process_index, accelerator.num_processes
    if local_dir(shards):  # checked once per dataset version and machine; every shard is also hashed while read
        verify_once(shards, ["train", "val"], checker=accelerator.is_local_main_process,
                    wait=accelerator.wait_for_everyone)

    training_step = build_training_step(params, config, accelerator)
    objective, sampler, ema, generator = (training_step.objective, training_step.sampler, training_step.ema,
                                          training_step.generator)
    scheduler = training_step.scheduler
    loader = TrainLoader(shards, "train", batch_size=micro_batch, rank=rank, world_size=world,
                         num_workers=t.num_workers, seed=t.seed, shuffle_buffer=t.shuffle_buffer)
    run_fingerprint = fingerprint(params, config, manifest_hash(shards))

    state = {"step": 0, "best_step": -1, "best_val_bpd": math.inf, "bad_validations": 0, "run_id": None}
    latest = ckpt.latest_checkpoint(checkpoint_dir) if t.resume else None
    if latest is not None:
        saved, ema_weights = ckpt.read_state(latest)
        if saved.get("fingerprint") != run_fingerprint:
            accelerator.print(f"ignoring checkpoints in {checkpoint_dir}: they belong to other params, data or code")
            latest = None
    if latest is None:
        accelerator.wait_for_everyone()  # every rank has looked before anything moves
        if accelerator.is_main_process:
            moved = ckpt.supersede(checkpoint_dir, extra=(BEST_WEIGHTS,))
            if moved is not None:
                accelerator.print(f"starting from scratch: moved the earlier run's checkpoints to {moved}")
            if curve_path.exists():  # else a resume before the first validation would keep its rows
                _write_curve(curve_path, [])
        accelerator.wait_for_everyone()
    if latest is not None:
        accelerator.load_state(str(latest))
        ema.load_state_dict(ema_weights)
        if len(saved["generators"]) == world:
            ckpt.generator_state_from_list(generator, saved["generators"][rank])
        else:
            generator.manual_seed(t.seed * 100003 + rank + 7919 * (saved["step"] + 1))
            accelerator.print(f"{latest} was written by {len(saved['generators'])} processes, this run has {world}: "
                              "training goes on, with other data order and noise than an uninterrupted run")
        sampler.load_state_dict({k: torch.tensor(v).numpy() for k, v in saved["sampler"].items()})
        state.update({k: saved[k] for k in state})
        accelerator.print(f"resumed from {latest} at step {state['step']}")
    curve = [row for row in read_curve(curve_path) if row["step"] <= state["step"]] if latest else []

    tracker = make_tracker(state["run_id"]) if accelerator.is_main_process and make_tracker else Tracker()
    if tracker.run_id != state["run_id"] or state["run_id"] is None:
        tracker.log_params({"model": config.to_dict(), "train": asdict(t), "num_processes": world})
        tracker.set_tags({"data.manifest_sha256": manifest_hash(shards), "data.location": str(shards)})
        tracker.log_dataset(**dataset_input(read_manifest(shards), manifest_hash(shards), str(shards)))
    state["run_id"] = tracker.run_id or state["run_id"]

    def save_checkpoint() -> None:
        step = state["step"]
        tmp = ckpt.temporary_dir(checkpoint_dir, step)
        accelerator.save_state(str(tmp))
        generators = accelerator.gather(generator.get_state().to(accelerator.device)[None])
        if accelerator.is_main_process:
            record = dict(state, fingerprint=run_fingerprint, generators=generators.cpu().tolist(),
                          sampler={k: v.tolist() for k, v in sampler.state_dict().items()})
            ckpt.finalize(checkpoint_dir, step, record, ema.state_dict(), t.keep_checkpoints)
        accelerator.wait_for_everyone()

    def validate() -> None:
        ema.ema_model.eval()
        result = split_elbo(ema.ema_model, shards, "val", t.val_batch_size, t.val_chunk, t.seed, rank, world,
                            reduce_sum=lambda x: accelerator.reduce(x, "sum"), decoder="discretized",
                            max_images=t.val_max_images)
        bpd = result.bits_per_dim()
        step = state["step"]
        tracker.log_metrics({f"val/{k}_bpd": v for k, v in bpd.items()}
                            | {f"val/{k}_nats": getattr(result, k) for k in ("total", "prior", "diffusion", "decoder")},
                            step)
        if accelerator.is_main_process:  # samples from fixed noise, so the UI shows them improving
            tracker.log_image(validation_grid(ema.ema_model, seed=t.seed), "samples/grid", step)
        if bpd["total"] < state["best_val_bpd"]:
            state.update(best_val_bpd=bpd["total"], best_step=step, bad_validations=0)
            if accelerator.is_main_process:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                weights = {k: v.detach().cpu().contiguous() for k, v in ema.ema_model.state_dict().items()}
                atomic_write(checkpoint_dir / BEST_WEIGHTS, lambda tmp: save_file(weights, tmp))
        else:
            state["bad_validations"] += 1
        if accelerator.is_main_process:
            curve.append({"step": step, "val_bpd": bpd["total"], "prior_bpd": bpd["prior"],
                          "diffusion_bpd": bpd["diffusion"], "decoder_bpd": bpd["decoder"]})
            _write_curve(curve_path, curve)
        accelerator.wait_for_everyone()

    progress = tqdm(total=t.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True)
    data_dim = config.data_dim
    # the ELBO objectives' loss is an unbiased batch estimate of -ELBO (nats per image); in bits/dim
    # only with the discretized decoder (the continuous one gives a density, not a probability)
    elbo_bits = t.objective in ("full_elbo", "random_t_elbo") and config.decoder == "discretized"
    window_start, window_images = time.perf_counter(), 0
    stopped_early = 0 < t.patience <= state["bad_validations"]  # a resumed run that had already stopped early
    micro_index = state["step"] * t.grad_accum
    objective.train()
    while state["step"] < t.max_steps and not stopped_early:
        for x, _ in loader.batches(micro_index):  # one endless stream from the resume position; workers start once
            x = batch_to_device(x, accelerator.device, t)
            loss, grad_norm = training_step(x, state["step"] + 1)
            micro_index += 1
            window_images += x.shape[0] * world
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            progress.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                metrics = {"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                           "train/grad_norm": float(grad_norm), "train/images_per_s": window_images / elapsed}
                if elbo_bits:
                    metrics["train/neg_elbo_bpd"] = mean_loss / (data_dim * math.log(2.0))
                tracker.log_metrics(metrics, step)
                shown = {"loss": f"{mean_loss:.4g}"}
                if elbo_bits:
                    shown["bpd"] = f"{metrics['train/neg_elbo_bpd']:.3f}"
                shown |= {"val_bpd": f"{state['best_val_bpd']:.4f}", "img_s": f"{metrics['train/images_per_s']:.0f}"}
                progress.set_postfix(shown)
                window_start, window_images = time.perf_counter(), 0
            if step % t.val_every == 0 or step == t.max_steps:
                validate()
                stopped_early = 0 < t.patience <= state["bad_validations"]
            preempted = bool(accelerator.gather(torch.tensor([stop.received], device=accelerator.device)).any())
            if step % t.checkpoint_every == 0 or step == t.max_steps or stopped_early or preempted:
                save_checkpoint()
            if preempted:
                progress.close()
                raise Preempted(f"stopped by signal at step {step}; checkpoint saved in {checkpoint_dir}")
            if step >= t.max_steps or stopped_early:
                break
    progress.close()

    if accelerator.is_main_process:
        best = checkpoint_dir / BEST_WEIGHTS
        weights = load_file(str(best)) if best.is_file() else ema.ema_model.state_dict()
        paths = save_model(ema.ema_model, model_dir / "model", weights)
        _write_curve(curve_path, curve)
        tracker.log_metrics({"best/val_bpd": state["best_val_bpd"], "best/step": state["best_step"]}, state["step"])
        tracker.log_artifacts([*paths, curve_path], "model")
    accelerator.wait_for_everyone()
    if owns_accelerator:
        accelerator.end_training()  # tear the process group down before the processes exit
    return TrainResult(state["step"], state["best_step"], state["best_val_bpd"], stopped_early, state["run_id"])
