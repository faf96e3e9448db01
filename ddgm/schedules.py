"""Noise schedules beta_1..beta_T of the fixed forward diffusion.

q(z_t | z_{t-1}) = N(sqrt(alpha_t) z_{t-1}, beta_t I),  alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s.  Everything here is float64 numpy; the diffusion casts once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SCHEDULES = ("constant", "linear", "cosine")
LINEAR_REFERENCE = (1e-4, 0.02)  # Ho et al.'s beta_1, beta_T at T = 1000
LINEAR_MAX_BETA = 0.999


def check_num_steps(num_steps: int) -> int:
    """Return ``num_steps`` if it is a valid number of diffusion steps T (an int >= 1)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps (T) must be an integer >= 1, got {num_steps!r}")
    return num_steps


def _check_beta(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return float(value)


def constant_betas(num_steps: int, beta: float) -> np.ndarray:
    """beta_t = beta for every t (the article's T=5 example uses beta=0.9 in code, 0.6 in text)."""
    return np.full(check_num_steps(num_steps), _check_beta("beta", beta), dtype=np.float64)


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_t linear from beta_start to beta_end, exactly as given (Ho et al. 2020: 1e-4 .. 0.02, T=1000)."""
    check_num_steps(num_steps)
    start, end = _check_beta("beta_start", beta_start), _check_beta("beta_end", beta_end)
    return np.linspace(start, end, num_steps, dtype=np.float64)


def scaled_linear_betas(num_steps: int, beta_start: float | None = None, beta_end: float | None = None,
                        max_beta: float = LINEAR_MAX_BETA) -> np.ndarray:
    """The ``linear`` schedule of a params file: beta_t linear from beta_start to beta_end, clipped to max_beta.

    An end point that is not given is Ho et al.'s value for T = 1000 (1e-4, 0.02) scaled by 1000 / T, as
    Nichol & Dhariwal 2021 do, so that sum_t beta_t ~ 10 and abar_T ~ exp(-sum_t beta_t) ~ 4e-5 whatever T
    (unscaled, T = 100 would end at abar_T = 0.36: a large L_T and sampling from the wrong prior). Below
    T = 21 the scaled beta_T passes 1, hence the clip. A given end point is used as it is.
    """
    check_num_steps(num_steps)
    scale = 1000.0 / num_steps
    start = LINEAR_REFERENCE[0] * scale if beta_start is None else _check_beta("beta_start", beta_start)
    end = LINEAR_REFERENCE[1] * scale if beta_end is None else _check_beta("beta_end", beta_end)
    return np.minimum(np.linspace(start, end, num_steps, dtype=np.float64), _check_beta("max_beta", max_beta))


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    beta_t = min(1 - abar(t)/abar(t-1), max_beta)."""
    check_num_steps(num_steps)
    if not isinstance(offset, (int, float)) or offset < 0:
        raise ValueError(f"offset (cosine s) must be >= 0, got {offset!r}")
    max_beta = _check_beta("max_beta", max_beta)
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + offset) / (1.0 + offset) * math.pi / 2.0) ** 2
    abar = f / f[0]
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def make_betas(name: str, num_steps: int, **params: float) -> np.ndarray:
    """Betas of the named schedule; ``params`` are the schedule's own keyword arguments."""
    builders: dict[str, Callable[..., np.ndarray]] = {
        "constant": constant_betas, "linear": scaled_linear_betas, "cosine": cosine_betas
    }
    if name not in builders:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    try:
        return builders[name](num_steps, **params)
    except TypeError as error:  # an argument the schedule does not take
        raise ValueError(f"bad parameters {sorted(params)} for schedule {name!r}: {error}") from None
