"""DVC stage ``train``: train a DDGM on the prepared shards; writes models/ and the val curve.

Usage: python -m pipeline.train [--params params.yaml]
Runs unchanged under ``accelerate launch -m pipeline.train`` and ``torchrun -m pipeline.train``.
Exits 75 after writing a checkpoint when SIGTERM/SIGUSR1 arrives (requeue and rerun to resume).
"""

from __future__ import annotations

import argparse
import sys

from ddgm.params import load_params
from ddgm.training.loop import Preempted, StopSignal, train
from pipeline.common import open_tracker, write_run_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="YAML params file")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    stop = StopSignal()
    stop.install()
    trackers = []

    def make_tracker(run_id: str | None):
        trackers.append(open_tracker(params.tracking, run_id))
        return trackers[-1]

    try:
        result = train(params, make_tracker=make_tracker, stop=stop)
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
        write_run_file(params.train.model_dir, tracker, params.tracking)
        tracker.close()  # the sample and evaluate stages reopen the run
    print(f"trained {result.step} steps; best val {result.best_val_bpd:.4f} bits/dim at step {result.best_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
