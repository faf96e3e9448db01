"""The fixed forward diffusion: closed-form marginals vs the iterated chain, the posterior
q(z_{t-1} | z_t, x) vs Bayes' rule, the epsilon parameterisation and the variance tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddgm.diffusion import GaussianDiffusion
from ddgm.schedules import constant_betas, cosine_betas, linear_betas

pytestmark = pytest.mark.usefixtures("single_thread")

# one value per data dimension, covering both ends of [-1, 1]
X_VALUES = torch.tensor([-1.0, -0.25, 0.5, 1.0], dtype=torch.float64)

SCHEDULES = {
    "constant0.9_T5": lambda: constant_betas(5, 0.9),
    "linear_T1000": lambda: linear_betas(1000),
    "cosine_T100": lambda: cosine_betas(100),
}


def _t(step: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), step, dtype=torch.long)


def _check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, se_factor: float = 5.0) -> None:
    """Per-dimension Monte Carlo check of mean and variance against the closed form.

    With N draws the sample mean has standard error sqrt(var / N) and the sample variance
    (Gaussian data) var * sqrt(2 / (N - 1)); both must lie within ``se_factor`` standard
    errors (5 SE: a false alarm per check has probability < 1e-6).
    """
    n = samples.shape[0]
    flat = samples.flatten(1)
    mean, var = mean.flatten(1)[0], var.flatten(1)[0]
    mean_err = (flat.mean(0) - mean).abs()
    assert torch.all(mean_err <= se_factor * torch.sqrt(var / n)), (mean_err, torch.sqrt(var / n))
    var_err = (flat.var(0) - var).abs()
    assert torch.all(var_err <= se_factor * var * math.sqrt(2.0 / (n - 1))), (var_err, var)


def _data(n: int, dtype=torch.float64) -> torch.Tensor:
    return X_VALUES.to(dtype).view(1, 1, 2, 2).expand(n, 1, 2, 2).contiguous()


# --- forward process ----------------------------------------------------------------------


def test_forward_chain_matches_closed_form_constant_beta() -> None:
    """The article's example: beta = 0.9, T = 5; every z_t of the iterated chain ~ q(z_t | x)."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(constant_betas(5, 0.9))
    n = 20000
    x = _data(n)
    latents = diffusion.forward_chain(x, torch.Generator().manual_seed(1))
    assert len(latents) == 5 and all(z.shape == x.shape and z.dtype == torch.float64 for z in latents)
    for step, z in enumerate(latents, start=1):
        mean, var = diffusion.q_marginal(x[:1], _t(step, 1))
        assert torch.allclose(mean.flatten(), 0.1 ** (step / 2) * X_VALUES, rtol=1e-6)
        assert torch.allclose(var.flatten(), torch.full((4,), 1 - 0.1**step, dtype=torch.float64), rtol=1e-6)
        _check_moments(z, mean, var.expand_as(mean))


def test_iterated_single_steps_match_closed_form_linear_T1000() -> None:
    """Iterate q_step_sample 1000 times and compare z_t at a few t with q(z_t | x)."""
    diffusion = GaussianDiffusion(linear_betas(1000))
    n = 10000
    x = _data(n)
    generator = torch.Generator().manual_seed(2)
    checkpoints = {1, 10, 100, 500, 1000}
    z = x
    for step in range(1, 1001):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        z = diffusion.q_step_sample(z, _t(step, n), noise)
        if step in checkpoints:
            mean, var = diffusion.q_marginal(x[:1], _t(step, 1))
            _check_moments(z, mean, var.expand_as(mean))


def test_forward_chain_matches_closed_form_linear_T1000() -> None:
    diffusion = GaussianDiffusion(linear_betas(1000))
    n = 3000  # float32 and all 1000 latents kept: 48 MB
    x = _data(n, torch.float32)
    latents = diffusion.forward_chain(x, torch.Generator().manual_seed(3))
    assert len(latents) == 1000
    for step in (1, 50, 300, 1000):
        mean, var = diffusion.q_marginal(x[:1].double(), _t(step, 1))
        _check_moments(latents[step - 1].double(), mean, var.expand_as(mean))


def test_q_sample_is_the_reparameterised_marginal() -> None:
    diffusion = GaussianDiffusion(linear_betas(1000))
    x = _data(3)
    t = torch.tensor([1, 500, 1000])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    mean, var = diffusion.q_marginal(x, t)
    assert torch.allclose(diffusion.q_sample(x, t, noise), mean + var.sqrt() * noise, rtol=1e-6, atol=1e-6)


def test_q_marginal_variance_is_accurate_at_small_t() -> None:
    """1 - abar_t must not be formed from a float32 abar (cancellation: 1.6e-4 relative error at
    t = 1 of the linear schedule); it must match the float64 value to float32 round-off."""
    betas = linear_betas(1000)
    diffusion = GaussianDiffusion(betas)
    t = torch.arange(1, 1001)
    _, var = diffusion.q_marginal(torch.zeros(1000, 1, dtype=torch.float64), t)
    expected = 1.0 - np.cumprod(1.0 - betas)
    np.testing.assert_allclose(var.flatten().numpy(), expected, rtol=1e-6)


def test_q_step_sample_is_one_forward_step() -> None:
    diffusion = GaussianDiffusion(constant_betas(3, 0.36))
    z = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    out = diffusion.q_step_sample(z, torch.tensor([2]), noise)
    assert torch.allclose(out, 0.8 * z + 0.6 * noise)


# --- posterior ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_posterior_is_bayes_product_of_step_and_marginal(schedule: str) -> None:
    """q(z_{t-1} | z_t, x) ∝ q(z_t | z_{t-1}) q(z_{t-1} | x), both Gaussian in z_{t-1}:

    precision = 1 / (1 - abar_{t-1}) + alpha_t / beta_t,
    mean = var * (sqrt(abar_{t-1}) x / (1 - abar_{t-1}) + sqrt(alpha_t) z_t / beta_t).
    Computed in float64 from the betas; the library keeps float32 tables (rel. error ~1e-7).
    """
    betas = SCHEDULES[schedule]()
    diffusion = GaussianDiffusion(betas)
    T = betas.size
    alpha = 1.0 - betas
    abar = np.cumprod(alpha)
    steps = np.arange(2, T + 1)
    abar_prev = abar[steps - 2]
    a, b = alpha[steps - 1], betas[steps - 1]
    var = 1.0 / (1.0 / (1.0 - abar_prev) + a / b)
    coef_x = var * np.sqrt(abar_prev) / (1.0 - abar_prev)
    coef_z = var * np.sqrt(a) / b

    t = torch.from_numpy(steps)
    ones = torch.ones(len(steps), 1, dtype=torch.float64)
    zeros = torch.zeros_like(ones)
    got_x, log_var = diffusion.q_posterior(ones, zeros, t)  # mean = coef_x
    got_z, _ = diffusion.q_posterior(zeros, ones, t)  # mean = coef_z
    np.testing.assert_allclose(got_x.flatten().numpy(), coef_x, rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(got_z.flatten().numpy(), coef_z, rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(log_var.exp().flatten().numpy(), var, rtol=2e-6)
    # and the notes' closed form: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    np.testing.assert_allclose(var, (1 - abar_prev) / (1 - abar[steps - 1]) * b, rtol=1e-12)


def test_posterior_mean_is_linear_in_x_and_z() -> None:
    diffusion = GaussianDiffusion(linear_betas(100))
    generator = torch.Generator().manual_seed(5)
    x, z = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    t = torch.randint(2, 101, (6,), generator=generator)
    mean, _ = diffusion.q_posterior(x, z, t)
    cx, _ = diffusion.q_posterior(torch.ones_like(x), torch.zeros_like(z), t)
    cz, _ = diffusion.q_posterior(torch.zeros_like(x), torch.ones_like(z), t)
    assert torch.allclose(mean, cx * x + cz * z, rtol=1e-12, atol=1e-12)


def test_posterior_at_t1_is_a_point_mass_at_x() -> None:
    diffusion = GaussianDiffusion(linear_betas(10))
    x, z = torch.randn(2, 4, 3, dtype=torch.float64)
    mean, log_var = diffusion.q_posterior(x, z, torch.ones(4, dtype=torch.long))
    assert torch.equal(mean, x)
    assert diffusion.posterior_var[1] == 0
    # the clipped log variance at t = 1 is log beta~_2 (finite)
    assert torch.allclose(log_var, diffusion.posterior_var[2].double().log().expand_as(log_var))


def test_tables_have_T_plus_one_entries_and_float64_source() -> None:
    diffusion = GaussianDiffusion(linear_betas(1000))
    assert diffusion.num_steps == 1000
    for name, buffer in diffusion.named_buffers():
        assert buffer.shape == (1001,), name
    assert diffusion.abar64.dtype == np.float64
    expected = np.concatenate([[1.0], np.cumprod(1 - linear_betas(1000))])
    np.testing.assert_allclose(diffusion.abar64, expected, rtol=1e-15)
    assert diffusion.abar[0] == 1 and diffusion.beta[0] == 0
    # buffers are not part of a checkpoint: they are a function of the config
    assert diffusion.state_dict() == {}


@pytest.mark.parametrize("betas", [np.array([]), np.array([0.1, 1.0]), np.array([0.0, 0.1]), np.ones((2, 2)) * 0.1])
def test_invalid_betas_raise(betas: np.ndarray) -> None:
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion(betas)


# --- prior term and epsilon parameterisation ------------------------------------------------


def test_prior_kl_closed_form() -> None:
    betas = constant_betas(5, 0.9)
    diffusion = GaussianDiffusion(betas)
    x = _data(2)
    abar = 0.1**5
    # KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)) = 0.5 (abar x^2 + (1 - abar) - 1 - log(1 - abar))
    expected = 0.5 * (abar * X_VALUES**2 - abar - math.log(1 - abar)).sum()
    assert torch.allclose(diffusion.prior_kl(x), expected.expand(2), rtol=1e-5)


def test_epsilon_parameterisation_identities() -> None:
    """x^(eps) and eps(x^) are inverse, and mu_theta(z_t, eps) = mu~_t(x^(eps), z_t) (Ho et al. eq. 11)."""
    diffusion = GaussianDiffusion(linear_betas(1000))
    generator = torch.Generator().manual_seed(6)
    t = torch.tensor([1, 2, 10, 100, 500, 999, 1000])
    x = torch.rand(7, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(7, 1, 2, 2, generator=generator, dtype=torch.float64)
    z = diffusion.q_sample(x, t, eps)
    assert torch.allclose(diffusion.x0_from_eps(z, t, eps), x, atol=1e-4)
    assert torch.allclose(diffusion.eps_from_x0(z, t, x), eps, atol=1e-4)
    mean_eps = diffusion.mean_from_eps(z, t, eps)
    mean_post, _ = diffusion.q_posterior(diffusion.x0_from_eps(z, t, eps), z, t)
    assert torch.allclose(mean_eps, mean_post, rtol=1e-5, atol=1e-5)


def test_reverse_log_variance_tables() -> None:
    diffusion = GaussianDiffusion(linear_betas(50))
    like = torch.zeros(50, 3, dtype=torch.float64)
    t = torch.arange(1, 51)
    small = diffusion.reverse_log_variance("fixed_small", t, like)[:, 0]
    large = diffusion.reverse_log_variance("fixed_large", t, like)[:, 0]
    log_beta = torch.from_numpy(np.log(linear_betas(50)))
    log_post = diffusion.posterior_var.double()[2:].log()
    assert torch.allclose(small[1:], log_post, rtol=1e-6)
    assert torch.allclose(large[1:], log_beta[1:], rtol=1e-6)
    assert small[0] == small[1] and large[0] == small[1]  # t = 1 uses beta~_2 for both
    assert torch.all(large >= small)
    lo = diffusion.reverse_log_variance("learned_range", t, like, -torch.ones_like(like))[:, 0]
    hi = diffusion.reverse_log_variance("learned_range", t, like, torch.ones_like(like))[:, 0]
    mid = diffusion.reverse_log_variance("learned_range", t, like, torch.zeros_like(like))[:, 0]
    assert torch.allclose(lo, small) and torch.allclose(hi, log_beta.to(hi)) and torch.allclose(mid, (lo + hi) / 2)
    with pytest.raises(ValueError, match="variance"):
        diffusion.reverse_log_variance("fixed_medium", t, like)
    with pytest.raises(ValueError, match="interpolation"):
        diffusion.reverse_log_variance("learned_range", t, like)
