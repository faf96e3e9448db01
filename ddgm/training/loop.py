"""The training loop: Accelerate for processes, mixed precision and gradient accumulation; the shard
loader for data; EMA weights; validation on the exact ELBO; resumable checkpoints.

``train`` reads top to bottom: check what is cheap to check, build the run (``TrainingRun.start``:
the training step, the loader, resume or a fresh start, the tracking run, the validator), take
optimizer steps (``TrainingRun.run``: after each, report, validate, checkpoint and answer signals
as due), then write the model (``TrainingRun.finish``). The pieces live in their own modules:
step.py (one optimizer step), lr_schedule.py, validator.py, checkpoint_policy.py (and checkpoint.py,
the files), train_log.py, curve.py, fingerprint.py, signals.py, launch.py.

The same code runs as one CPU process or under ``accelerate launch`` / ``torchrun`` on many
GPUs and machines. Only the main process writes model files and talks to the tracker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ddgm.config import ModelConfig, ModelSpec, ScheduleConfig
from ddgm.data import TrainLoader, manifest_hash, read_manifest, verify_once
from ddgm.data.lineage import dataset_input
from ddgm.data.location import local_dir
from ddgm.serialization import save_model
from ddgm.training import checkpoint as ckpt
from ddgm.training.acceleration import batch_to_device
from ddgm.training.checkpoint_policy import CheckpointPolicy
from ddgm.training.config import TrainConfig, micro_batch_size
from ddgm.training.fingerprint import fingerprint
from ddgm.training.launch import check_world_size, make_accelerator
from ddgm.training.run_state import RunState
from ddgm.training.signals import Preempted, StopSignal
from ddgm.training.step import TrainingStep, build_training_step
from ddgm.training.tracking import Tracker
from ddgm.training.train_log import TrainLog
from ddgm.training.validator import Validator

MakeTracker = Callable[[str | None], Tracker]


@dataclass
class TrainResult:
    step: int
    best_step: int
    best_val_bpd: float
    stopped_early: bool
    run_id: str | None
    validation_share: float = 0.0  # of this process's training-loop wall time


def train(spec: ModelSpec, diffusion: ScheduleConfig, config: TrainConfig, shards: str,
          accelerator: Accelerator | None = None, make_tracker: MakeTracker | None = None,
          stop: StopSignal | None = None) -> TrainResult:
    """Train the model of ``spec`` and ``diffusion`` as ``config`` says on the shards at ``shards``
    (a directory or URL prefix holding manifest.json); see the module doc.

    ``make_tracker(run_id)`` opens the tracking run (``run_id`` is the resumed run's, or None);
    it is called on the main process only. ``stop`` is set by the caller's signal handler.
    """
    manifest = read_manifest(shards)  # everything that can be checked cheaply is checked before any shard is read
    model_config = ModelConfig.build(spec, diffusion, manifest.image_shape, manifest.num_levels)
    owns_accelerator = accelerator is None
    accelerator = accelerator or make_accelerator(config, model_config.formulation)
    check_world_size(accelerator)
    micro_batch = micro_batch_size(config, accelerator.num_processes)
    if local_dir(shards):  # checked once per dataset version and machine; every shard is also hashed while read
        verify_once(shards, ["train", "val"], checker=accelerator.is_local_main_process,
                    wait=accelerator.wait_for_everyone)
    run = TrainingRun.start(model_config, config, shards, micro_batch, accelerator, make_tracker,
                            stop or StopSignal())
    stopped_early = run.run()
    run.finish()
    if owns_accelerator:
        accelerator.end_training()  # tear the process group down before the processes exit
    state = run.state
    return TrainResult(state.step, state.best_step, state.best_val_bpd, stopped_early, state.run_id,
                       run.time_metrics()["time/validation_share"])


@dataclass
class TrainingRun:
    """A run's parts, built by ``start``; ``state`` is what its checkpoints count."""

    model_config: ModelConfig
    train: TrainConfig
    step: TrainingStep
    loader: TrainLoader
    checkpoints: CheckpointPolicy
    state: RunState
    tracker: Tracker
    validator: Validator
    stop: StopSignal
    loop_seconds: float = 0.0  # wall time of ``run`` in this process, validation included

    @classmethod
    def start(cls, model_config: ModelConfig, train: TrainConfig, shards: str, micro_batch: int,
              accelerator: Accelerator, make_tracker: MakeTracker | None, stop: StopSignal) -> TrainingRun:
        """The training step, the loader, this run's checkpoints (resumed, or moved aside for a fresh
        start), its tracking run and its validator."""
        step = build_training_step(train, model_config, accelerator)
        loader = TrainLoader(shards, "train", batch_size=micro_batch, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, num_workers=train.num_workers, seed=train.seed,
                             shuffle_buffer=train.shuffle_buffer)
        checkpoints = CheckpointPolicy(train.checkpoint_dir, train, fingerprint(train, model_config,
                                                                                  manifest_hash(shards)), step)
        state = RunState()
        resumed = checkpoints.resume(state)
        tracker = open_tracking(make_tracker, accelerator, state, model_config, train, shards)
        validator = Validator(step, tracker, shards, train, state, resumed)
        return cls(model_config, train, step, loader, checkpoints, state, tracker, validator, stop)

    def run(self) -> bool:
        """Optimizer steps until train.max_steps, early stopping or a signal (Preempted); whether the
        run stopped early (also when a resumed run had already)."""
        t, state, accelerator = self.train, self.state, self.step.accelerator
        log = TrainLog(accelerator, self.tracker, t, self.model_config, state.step)
        stopped_early = state.stopped_early(t.patience)
        micro_index = state.step * t.grad_accum
        self.step.objective.train()
        started = time.perf_counter()
        try:
            while state.step < t.max_steps and not stopped_early:
                for x, _ in self.loader.batches(micro_index):  # one endless stream from the resume position
                    x = batch_to_device(x, accelerator.device, t)
                    loss, grad_norm = self.step(x, state.step + 1)
                    micro_index += 1
                    log.count(x.shape[0] * accelerator.num_processes)
                    if not accelerator.sync_gradients:
                        continue
                    state.step += 1
                    log.step(state.step, loss, grad_norm, self.step.lr, state.best_val_bpd)
                    stopped_early = self.after_step()
                    if state.step >= t.max_steps or stopped_early:
                        break
        finally:
            log.close()
            self.loop_seconds += time.perf_counter() - started
        return stopped_early

    def after_step(self) -> bool:
        """Validate, checkpoint and answer a signal, as due after an optimizer step; whether the run
        stops early. Every rank takes part (the signal counts when any rank received it)."""
        state, accelerator = self.state, self.step.accelerator
        stopped_early = False
        if self.validator.due(state.step):
            self.validator(state)
            stopped_early = state.stopped_early(self.train.patience)
        preempted = bool(accelerator.gather(torch.tensor([self.stop.received], device=accelerator.device)).any())
        if self.checkpoints.due(state.step, stopped_early, preempted):
            self.checkpoints.save(state)
        if preempted:
            raise Preempted(f"stopped by signal at step {state.step}; checkpoint saved in "
                            f"{self.checkpoints.directory}")
        return stopped_early

    def finish(self) -> None:
        """Main process: models/ gets the EMA weights of the best validation (the last EMA weights when
        there was none), the curve is written, and both are logged with the best validation."""
        accelerator, state, model = self.step.accelerator, self.state, self.step.ema.ema_model
        if accelerator.is_main_process:
            best = ckpt.best_weights(self.checkpoints.directory)  # None: no validation ran, the last EMA weights
            paths = save_model(model, Path(self.train.model_dir) / "model", best)
            curve = self.validator.write_curve()
            self.tracker.log_metrics({"best/val_bpd": state.best_val_bpd, "best/step": state.best_step}
                                     | self.time_metrics(), state.step)
            self.tracker.log_artifacts([*paths, curve], "model")
        accelerator.wait_for_everyone()


    def time_metrics(self) -> dict[str, float]:
        """Wall time of this process's training loop and the share of it spent validating."""
        share = self.validator.seconds / self.loop_seconds if self.loop_seconds > 0 else 0.0
        return {"time/loop_seconds": self.loop_seconds, "time/validation_seconds": self.validator.seconds,
                "time/validation_share": share}


def open_tracking(make_tracker: MakeTracker | None, accelerator: Accelerator, state: RunState,
                  model_config: ModelConfig, train: TrainConfig, shards: str) -> Tracker:
    """The run's tracker (a no-op one on other ranks): a new run gets the params, the data tags and the
    dataset input; a resumed run (``state.run_id``) goes on logging to its run."""
    tracker = make_tracker(state.run_id) if accelerator.is_main_process and make_tracker else Tracker()
    if tracker.run_id != state.run_id or state.run_id is None:
        digest = manifest_hash(shards)
        tracker.log_params({"model": model_config.to_dict(), "train": asdict(train),
                            "num_processes": accelerator.num_processes})
        tracker.set_tags({"data.manifest_sha256": digest, "data.location": str(shards)})
        tracker.log_dataset(**dataset_input(read_manifest(shards), digest, str(shards)))
    state.run_id = tracker.run_id or state.run_id
    return tracker
