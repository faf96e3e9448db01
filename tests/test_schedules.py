"""Noise schedules: values of constant / linear / cosine betas and validation of their parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddgm.schedules import SCHEDULES, constant_betas, cosine_betas, linear_betas, make_betas


def test_constant_schedule_values_and_dtype() -> None:
    betas = constant_betas(5, 0.9)
    assert betas.dtype == np.float64 and betas.shape == (5,)
    assert np.all(betas == 0.9)
    assert np.array_equal(make_betas("constant", 5, beta=0.9), betas)


def test_linear_schedule_matches_ho_et_al() -> None:
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    steps = np.diff(betas)
    assert np.allclose(steps, (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)
    # the default parameters are Ho et al.'s
    assert np.array_equal(make_betas("linear", 1000), betas)
    assert np.array_equal(make_betas("linear", 1000, beta_start=1e-4, beta_end=0.02), betas)


def test_linear_schedule_with_one_step() -> None:
    assert np.array_equal(linear_betas(1, 0.3, 0.5), np.array([0.3]))


@pytest.mark.parametrize("num_steps", [1, 10, 100, 1000])
def test_cosine_abar_matches_closed_form(num_steps: int) -> None:
    offset, max_beta = 0.008, 0.999
    betas = cosine_betas(num_steps, offset, max_beta)
    assert betas.dtype == np.float64 and betas.shape == (num_steps,)
    assert np.all(betas > 0) and np.all(betas <= max_beta)

    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / num_steps + offset) / (1 + offset) * math.pi / 2) ** 2

    t = np.arange(num_steps + 1, dtype=np.float64)
    closed = f(t) / f(np.zeros(1))
    abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    # f(T) = cos^2(pi/2) = 0, so beta_T is clipped to max_beta; every unclipped step's abar
    # must equal the closed form to float64 round-off (one rounding per factor of the product).
    unclipped = np.concatenate([[True], np.cumprod(betas < max_beta).astype(bool)])
    assert unclipped[: num_steps].all() or num_steps == 1
    np.testing.assert_allclose(abar[unclipped], closed[unclipped], rtol=1e-12, atol=1e-15)
    assert betas[-1] == max_beta  # the clipped last step


def test_cosine_respects_smaller_max_beta() -> None:
    betas = cosine_betas(50, max_beta=0.2)
    assert betas.max() == 0.2 and np.all(betas <= 0.2)


def test_make_betas_dispatches_every_schedule() -> None:
    for name in SCHEDULES:
        params = {"beta": 0.5} if name == "constant" else {}
        betas = make_betas(name, 7, **params)
        assert betas.dtype == np.float64 and betas.shape == (7,)
        assert np.all((betas > 0) & (betas < 1))


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: constant_betas(5, 0.0), "beta"),
        (lambda: constant_betas(5, 1.0), "beta"),
        (lambda: constant_betas(5, -0.1), "beta"),
        (lambda: constant_betas(5, 1.5), "beta"),
        (lambda: constant_betas(5, float("nan")), "beta"),
        (lambda: constant_betas(5, "0.5"), "beta"),
        (lambda: linear_betas(10, 0.0, 0.02), "beta_start"),
        (lambda: linear_betas(10, 1e-4, 1.0), "beta_end"),
        (lambda: cosine_betas(10, max_beta=1.0), "max_beta"),
        (lambda: cosine_betas(10, offset=-0.1), "offset"),
        (lambda: make_betas("constant", 5, beta=2.0), "beta"),
    ],
)
def test_bad_beta_parameters_raise_naming_them(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, 10.0, "10", True, None, np.int64(0)])
@pytest.mark.parametrize("name", SCHEDULES)
def test_bad_num_steps_raise(name: str, num_steps) -> None:
    params = {"beta": 0.5} if name == "constant" else {}
    with pytest.raises(ValueError, match="num_steps"):
        make_betas(name, num_steps, **params)


def test_unknown_schedule_name_raises() -> None:
    with pytest.raises(ValueError, match=r"schedule.*'quadratic'"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize(
    ("name", "params", "unknown"),
    [
        ("linear", {"beta": 0.1}, "beta"),
        ("constant", {"beta": 0.1, "beta_end": 0.2}, "beta_end"),
        ("cosine", {"s": 0.008}, "s"),
    ],
)
def test_unknown_schedule_parameter_raises_naming_it(name: str, params: dict, unknown: str) -> None:
    with pytest.raises(ValueError, match=f"'{unknown}'"):
        make_betas(name, 10, **params)


def test_missing_schedule_parameter_raises() -> None:
    with pytest.raises(ValueError, match="beta"):
        make_betas("constant", 10)


@pytest.mark.parametrize("num_steps", [5, 10, 20, 21, 50, 100, 250, 1000, 4000])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_default_schedules_reach_the_prior_for_every_T(name: str, num_steps: int) -> None:
    """abar_T ~ 0 for the default end points at every T, so L_T ~ 0 and sampling starts from N(0, I)."""
    betas = make_betas(name, num_steps)
    assert betas.shape == (num_steps,) and np.all(betas > 0) and np.all(betas < 1)
    assert np.all(np.diff(betas) >= 0)
    abar_T = np.prod(1.0 - betas)
    assert abar_T < 1e-4, abar_T


@pytest.mark.parametrize("num_steps", [21, 100, 250, 1000, 4000])
def test_linear_defaults_are_scaled_by_1000_over_T(num_steps: int) -> None:
    """Nichol & Dhariwal 2021: beta_1 = 1e-4 * 1000/T, beta_T = 0.02 * 1000/T (no clipping from T = 21 on)."""
    betas = make_betas("linear", num_steps)
    scale = 1000 / num_steps
    np.testing.assert_allclose(betas, np.linspace(1e-4 * scale, 0.02 * scale, num_steps), rtol=1e-15)
    # sum of betas (and so the total noise) is T-independent to first order
    assert abs(betas.sum() - linear_betas(1000).sum()) < 1e-9 * num_steps


def test_linear_small_T_is_clipped_and_given_end_points_are_kept() -> None:
    betas = make_betas("linear", 10)
    assert betas[0] == pytest.approx(0.01) and betas[-1] == 0.999
    np.testing.assert_array_equal(make_betas("linear", 20, beta_start=1e-3, beta_end=0.2),
                                  linear_betas(20, 1e-3, 0.2))
    # a given beta_end with the default beta_start scaled to T
    assert make_betas("linear", 100, beta_end=0.05)[0] == pytest.approx(1e-3)
