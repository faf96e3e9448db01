"""Noise schedules beta_1..beta_T of the fixed forward diffusion.

q(z_t | z_{t-1}) = N(sqrt(alpha_t) z_{t-1}, beta_t I),  alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s.  Everything here is float64 numpy; the diffusion casts once.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "linear", "cosine")


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
    """beta_t linear from beta_start to beta_end (Ho et al. 2020: 1e-4 .. 0.02 with T=1000)."""
    check_num_steps(num_steps)
    start, end = _check_beta("beta_start", beta_start), _check_beta("beta_end", beta_end)
    return np.linspace(start, end, num_steps, dtype=np.float64)


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
    builders = {"constant": constant_betas, "linear": linear_betas, "cosine": cosine_betas}
    if name not in builders:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    try:
        return builders[name](num_steps, **params)
    except TypeError as error:  # an argument the schedule does not take
        raise ValueError(f"bad parameters {sorted(params)} for schedule {name!r}: {error}") from None
