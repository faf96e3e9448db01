"""Which stage failures are bad input, and the one line that tells the user about them.

Input the user can fix: a missing file, a corrupt or truncated shard or manifest, an unreadable
image, a bad parameter, a tracking store that is required but unusable, a loss that became
non-finite. ``input_error_hint`` gives the line for those (naming the file or parameter and what
to do) and None for anything else, which is unexpected and keeps its traceback.
``run_reporting_input_errors(main)`` runs a stage's ``main`` that way: one line on stderr and exit
status 1 for bad input; ``DDGM_TRACEBACK=1`` shows the traceback of every error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ddgm.data.errors import DataError

# Modules that validate params: a ValueError raised there is a bad parameter.
PARAMS_MODULES = ("ddgm.config", "ddgm.data.params", "ddgm.training.config", "pipeline.params", "pipeline.params_file",
                  "pipeline.threads")
TRACEBACK_ENV = "DDGM_TRACEBACK"
INPUT_ERROR_EXIT = 1
MISSING_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class StageInputError(ValueError):
    """Input a stage cannot use; the message names the file or parameter and what to do."""


def raised_in(error: BaseException) -> str:
    """The module whose code raised ``error`` (its innermost traceback frame)."""
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "")


def is_a(error: BaseException, module: str, name: str) -> bool:
    """``error`` is an instance of ``module.name`` (False when that module was never imported:
    the prepare stage does not import the training code)."""
    kind = getattr(sys.modules.get(module), name, None)
    return kind is not None and isinstance(error, kind)


def input_error_hint(error: BaseException) -> str | None:
    """What to tell the user about an input error, or None when ``error`` is unexpected."""
    text = " ".join(str(error).split())
    if isinstance(error, StageInputError) or is_a(error, "ddgm.training.tracking", "TrackingError"):
        return text
    if is_a(error, "ddgm.training.step", "NonFiniteLoss"):
        return f"{text}; lower train.lr (or train.grad_clip) and rerun"
    about_shards = "shard" in text or "manifest" in text
    if isinstance(error, (DataError, *MISSING_FILE_ERRORS)):
        return f"{text}; rebuild the shards with `dvc repro -f prepare`" if about_shards else text
    if isinstance(error, ValueError) and raised_in(error) in PARAMS_MODULES:
        return f"{text}; fix it in the params file (or the -S option)"
    return None


def stage_name(main: Callable) -> str:
    """'train' for pipeline.train's main, also when it runs as __main__ (python -m pipeline.train)."""
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
    return (spec.name if spec else main.__module__).rpartition(".")[2]


def run_reporting_input_errors(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit status; an input error becomes one line on stderr and status 1."""
    try:
        return main(argv) or 0
    except Exception as error:
        hint = input_error_hint(error)
        if hint is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"{stage_name(main)}: error: {hint} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return INPUT_ERROR_EXIT
