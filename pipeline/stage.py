"""The process entry point of the train, sample and evaluate stages: ``sys.exit(run_stage(main))``.

It sets the process's torch thread count from the params file's ``compute`` section
(pipeline/threads.py), then runs ``main`` so that a failure on bad input is one line on stderr
and exit status 1 (pipeline/errors.py); unexpected errors keep their traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pipeline.errors import run_reporting_input_errors
from pipeline.params import ComputeParams
from pipeline.params_file import load_section
from pipeline.threads import apply_threads


def params_path(argv: list[str] | None) -> str:
    """The --params file a stage's command line names (params.yaml by default)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_known_args(argv)[0].params


def run_stage(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status, with this process's threads set; bad input gives one line on
    stderr and status 1."""

    def with_threads(args: list[str] | None) -> int | None:
        apply_threads(load_section(params_path(args), "compute", ComputeParams))
        return main(args)

    with_threads.__module__ = main.__module__  # the stage's name in the error line
    return run_reporting_input_errors(with_threads, argv)
