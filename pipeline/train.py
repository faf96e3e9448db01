"""DVC stage ``train``: train a DDGM on the prepared shards; writes models/ and the val curve.

Usage: python -m pipeline.train [--params params.yaml]
Runs unchanged under ``accelerate launch -m pipeline.train`` and ``torchrun -m pipeline.train``.
Exits 75 after writing a checkpoint when SIGTERM/SIGUSR1 arrives (requeue and rerun to resume),
1 with one line on stderr on bad input (pipeline/errors.py).
Environment: ``DDGM_SHARDS`` moves the shards (data.out_dir: a directory, s3://..., pipe:...) and
``DDGM_CHECKPOINT_DIR`` the checkpoints (train.checkpoint_dir), e.g. to storage every node shares.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from ddgm.training.loop import train
from ddgm.training.signals import Preempted, StopSignal
from ddgm.training.tracking import Tracker
from pipeline.common import check_required_tracking, open_tracker, system_metrics_on, training_note, write_run_file
from pipeline.params import load_params
from pipeline.stage import run_stage

SOURCE = "pipeline/train.py"  # the run's mlflow.source.name
SHARDS_ENV, CHECKPOINT_DIR_ENV = "DDGM_SHARDS", "DDGM_CHECKPOINT_DIR"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="YAML params file")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    check_required_tracking(params.tracking)
    shards = os.environ.get(SHARDS_ENV) or params.data.out_dir
    config = replace(params.train, checkpoint_dir=os.environ.get(CHECKPOINT_DIR_ENV) or params.train.checkpoint_dir)
    stop = StopSignal()
    stop.install()
    trackers: list[Tracker] = []

    def make_tracker(run_id: str | None) -> Tracker:
        tracker = open_tracker(params.tracking, run_id, resume_training=run_id is not None, source=SOURCE,
                               system_metrics=system_metrics_on(params.tracking))
        if run_id is None:
            for section, text in training_note(params, args.params, shards).items():
                tracker.note(section, text)
        trackers.append(tracker)
        return tracker

    try:
        result = train(params.model, params.diffusion, config, shards, make_tracker=make_tracker, stop=stop)
    except Preempted as preempted:
        print(preempted, file=sys.stderr)
        for tracker in trackers:  # the resumed job sets the run RUNNING again
            tracker.close("KILLED")
        return Preempted.exit_code
    except BaseException:
        for tracker in trackers:
            tracker.close("FAILED")
        raise
    for tracker in trackers:
        tracker.log_model(Path(params.train.model_dir) / "model", params.tracking.register_model)
        write_run_file(params.train.model_dir, tracker, params.tracking)
        tracker.close()  # the sample and evaluate stages reopen the run
    print(f"trained {result.step} steps; best val {result.best_val_bpd:.4f} bits/dim at step {result.best_step}; "
          f"validation took {100 * result.validation_share:.1f}% of the training loop")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
