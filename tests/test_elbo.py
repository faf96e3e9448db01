"""The negative ELBO: its Gaussian building blocks, the bound itself against an exact marginal
likelihood, and the unbiasedness of the random-t and full-chain estimators.

Monte Carlo checks compare an average of N draws with its target using the sample standard
error SE = std / sqrt(N) and a 4.5-5 SE tolerance (false alarm < 1e-5 per check for roughly
normal averages); every generator is seeded, so the tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddgm.config import ModelConfig, ScheduleConfig
from ddgm.distributions import discretized_gaussian_log_likelihood, normal_kl, normal_log_density
from ddgm.likelihood import elbo_terms, nats_to_bits_per_dim
from ddgm.models import build_model
from ddgm.models.base import DDGM
from ddgm.objectives import compute_objective, full_elbo, hybrid_loss, random_t_elbo, simple_loss
from ddgm.schedules import linear_betas
from ddgm.timestep_sampler import ImportanceSampler, UniformSampler

SE_TOL = 4.5

pytestmark = pytest.mark.usefixtures("single_thread")


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double().flatten()
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


# --- Gaussian building blocks ---------------------------------------------------------------


def test_normal_kl_matches_monte_carlo() -> None:
    """KL(N1 || N2) = E_{N1}[log N1(z) - log N2(z)], estimated with 200k draws per pair (5 SE)."""
    generator = torch.Generator().manual_seed(0)
    mean1 = torch.tensor([0.0, 1.0, -2.0, 0.3], dtype=torch.float64)
    log_var1 = torch.tensor([0.0, -1.0, 1.5, -4.0], dtype=torch.float64)
    mean2 = torch.tensor([0.5, 1.0, 0.0, 0.25], dtype=torch.float64)
    log_var2 = torch.tensor([0.3, 0.0, 1.0, -3.5], dtype=torch.float64)
    z = mean1 + torch.exp(0.5 * log_var1) * torch.randn(200_000, 4, generator=generator, dtype=torch.float64)
    log_ratio = normal_log_density(z, mean1, log_var1) - normal_log_density(z, mean2, log_var2)
    mc = log_ratio.mean(0)
    se = log_ratio.std(0) / math.sqrt(z.shape[0])
    kl = normal_kl(mean1, log_var1, mean2, log_var2)
    assert torch.all((kl - mc).abs() <= 5 * se), (kl, mc, se)
    # exact cross-check and the basic properties
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, torch.exp(0.5 * log_var1)),
        torch.distributions.Normal(mean2, torch.exp(0.5 * log_var2)),
    )
    assert torch.allclose(kl, reference, rtol=1e-12, atol=1e-14)
    assert torch.all(kl >= 0)
    assert torch.allclose(normal_kl(mean1, log_var1, mean1, log_var1), torch.zeros(4, dtype=torch.float64))


def test_normal_log_density_matches_torch() -> None:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    mean, log_var = torch.tensor(0.4, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(x)
    assert torch.allclose(normal_log_density(x, mean, log_var), expected, rtol=1e-12)


def _grid(num_levels: int, dtype=torch.float64) -> torch.Tensor:
    return torch.arange(num_levels, dtype=dtype) * (2.0 / (num_levels - 1)) - 1.0


MEANS = [-1e4, -30.0, -1.0, -0.5, -1e-3, 0.0, 0.37, 1.0, 1.0 + 1e-3, 7.0, 1e4]
LOG_SCALES = [-15.0, -8.0, -3.0, -1.0, 0.0, 2.0, 8.0]


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_discretized_decoder_probabilities_sum_to_one(num_levels: int) -> None:
    """The K bin probabilities (edge bins extended to +-inf) sum to 1 for any mean and scale."""
    x = _grid(num_levels)
    mean, log_scale = torch.meshgrid(
        torch.tensor(MEANS, dtype=torch.float64), torch.tensor(LOG_SCALES, dtype=torch.float64), indexing="ij"
    )
    mean, log_scale = mean.reshape(-1, 1), log_scale.reshape(-1, 1)
    log_p = discretized_gaussian_log_likelihood(
        x.expand(mean.shape[0], -1), mean.expand(-1, num_levels), log_scale.expand(-1, num_levels), num_levels
    )
    assert log_p.dtype == torch.float64
    assert torch.all(log_p <= 1e-12) and not torch.isnan(log_p).any()
    total = torch.logsumexp(log_p, dim=1).exp()
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-9), total


def test_discretized_decoder_matches_cdf_differences() -> None:
    num_levels = 17
    x = _grid(num_levels)
    h = 1.0 / (num_levels - 1)
    mean, scale = 0.2, 0.3
    cdf = lambda v: torch.special.ndtr((v - mean) / scale)  # noqa: E731
    expected = cdf(x + h) - cdf(x - h)
    expected[0], expected[-1] = cdf(x[0] + h), 1 - cdf(x[-1] - h)
    log_scale = torch.full_like(x, math.log(scale))
    got = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), log_scale, num_levels).exp()
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_discretized_decoder_gradients_are_finite(num_levels: int, dtype: torch.dtype) -> None:
    """No NaN/inf gradient anywhere: edge bins (the +-inf branches), bins far from the mean,
    extreme means and tiny or huge scales."""
    x = _grid(num_levels, dtype)
    mean0, log_scale0 = torch.meshgrid(
        torch.tensor(MEANS, dtype=dtype), torch.tensor(LOG_SCALES, dtype=dtype), indexing="ij"
    )
    mean = mean0.reshape(-1, 1).expand(-1, num_levels).clone().requires_grad_(True)
    log_scale = log_scale0.reshape(-1, 1).expand(-1, num_levels).clone().requires_grad_(True)
    log_p = discretized_gaussian_log_likelihood(x.expand_as(mean), mean, log_scale, num_levels)
    assert log_p.dtype == dtype
    assert torch.isfinite(log_p).all()
    log_p.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_discretized_decoder_rejects_bad_num_levels() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="num_levels"):
        discretized_gaussian_log_likelihood(x, x, x, 1)


def test_bits_per_dim_conversion() -> None:
    assert nats_to_bits_per_dim(64 * math.log(2.0) * 3.0, 64) == pytest.approx(3.0)


# --- THE BOUND TEST: exact marginal likelihood of a linear-Gaussian DDGM ----------------------
#
# Data x ~ N(m, diag(s^2)). The forward marginals are z_t ~ N(sqrt(abar_t) m, P_t) with
# P_t = abar_t s^2 + 1 - abar_t, and cov(z_{t-1}, z_t) = sqrt(alpha_t) P_{t-1}, so the true
# reverse conditional is Gaussian:
#   q(z_{t-1} | z_t) = N(mu_{t-1} + G_t (z_t - mu_t), W_t),  G_t = sqrt(alpha_t) P_{t-1} / P_t,
#                      W_t = beta_t P_{t-1} / P_t           (t = 1: q(x | z_1), P_0 = s^2).
# A DDGM with these reverse conditionals and p(z_T) = N(0, I) has an exact marginal p(x): push
# N(0, I) through the linear-Gaussian chain. -ELBO >= -log p(x) for every x; the average gap is
# KL(q(z_T) || N(0, I)) - KL(q(x) || p(x)), which vanishes as abar_T -> 0 (T large).

DATA_MEAN = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=torch.float64)
DATA_STD = torch.tensor([0.5, 0.2, 0.8, 0.35], dtype=torch.float64)


class ExactReverseDDGM(DDGM):
    """A DDGM on [B, 1, 2, 2] whose reverse conditionals are the exact ones of Gaussian data."""

    def __init__(self, num_steps: int):
        config = ModelConfig(
            formulation="epsilon",
            image_shape=(1, 2, 2),
            decoder="continuous",
            variance="fixed_large",
            diffusion=ScheduleConfig("linear", num_steps, beta_start=1e-4, beta_end=0.02),  # as given
            network="mlp",
        )
        super().__init__(config)
        betas = torch.from_numpy(np.concatenate([[0.0], linear_betas(num_steps)]))  # float64, index t
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        self.betas, self.alphas, self.abar = betas, alphas, abar
        var = abar[:, None] * DATA_STD**2 + (1.0 - abar[:, None])  # P_t  [T+1, D]
        self.marg_mean = abar.sqrt()[:, None] * DATA_MEAN  # mu_t [T+1, D]
        var_prev = torch.cat([var[:1], var[:-1]])
        self.gain = alphas.sqrt()[:, None] * var_prev / var  # G_t (row 0 unused)
        self.cond_var = betas[:, None] * var_prev / var  # W_t (row 0 unused)

    def reverse_mean_logvar(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = z_t.flatten(1)
        mean = self.marg_mean[t - 1] + self.gain[t] * (flat - self.marg_mean[t])
        return mean.view_as(z_t), self.cond_var[t].log().view_as(z_t)

    def neg_log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """-log p_model(x): z_T ~ N(0, I) pushed through z_{t-1} = mu_{t-1} + G_t (z_t - mu_t) + N(0, W_t)."""
        mean = torch.zeros(4, dtype=torch.float64)
        var = torch.ones(4, dtype=torch.float64)
        for t in range(self.num_steps, 0, -1):
            mean = self.marg_mean[t - 1] + self.gain[t] * (mean - self.marg_mean[t])
            var = self.gain[t] ** 2 * var + self.cond_var[t]
        flat = x.flatten(1)
        return 0.5 * (torch.log(2 * math.pi * var) + (flat - mean) ** 2 / var).sum(1)

    def expected_neg_elbo(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ELBO's terms in closed form (prior [B], levels [B, T]; column t-1 = L_{t-1}),
        each expectation over z_t ~ q(z_t | x) taken analytically. Independent of ddgm's tables."""
        flat = x.flatten(1)
        ab, al, be = self.abar, self.alphas, self.betas
        T = self.num_steps
        prior = 0.5 * (ab[T] * flat**2 + (1 - ab[T]) - 1 - torch.log(1 - ab[T])).sum(1)
        levels = []
        for t in range(1, T + 1):
            # model mean mu_{t-1} + G_t (z_t - mu_t), z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps
            gain, w = self.gain[t], self.cond_var[t]
            offset = self.marg_mean[t - 1] - gain * self.marg_mean[t]
            if t == 1:  # L_0 = E[-log N(x | model mean, W_1)]
                diff_mean = flat - offset - gain * ab[1].sqrt() * flat
                diff_var = gain**2 * (1 - ab[1])
                levels.append((0.5 * torch.log(2 * math.pi * w) + (diff_mean**2 + diff_var) / (2 * w)).sum(1))
                continue
            coef_x = ab[t - 1].sqrt() * be[t] / (1 - ab[t])
            coef_z = al[t].sqrt() * (1 - ab[t - 1]) / (1 - ab[t])
            post_var = (1 - ab[t - 1]) / (1 - ab[t]) * be[t]
            diff_mean = coef_x * flat + (coef_z - gain) * ab[t].sqrt() * flat - offset
            diff_var = (coef_z - gain) ** 2 * (1 - ab[t])
            levels.append(0.5 * (torch.log(w / post_var) + post_var / w - 1 + (diff_mean**2 + diff_var) / w).sum(1))
        return prior, torch.stack(levels, 1)


class PosteriorVarianceIsBeta(ExactReverseDDGM):
    """INJECTED ERROR: the bound's posterior q(z_{t-1} | z_t, x) uses the forward step variance
    beta_t instead of beta~_t. The 'ELBO' it yields is no bound and the check must say so."""

    def __init__(self, num_steps: int):
        super().__init__(num_steps)
        tables = self.diffusion
        tables.posterior_log_var_clipped[2:] = tables.log_beta[2:]


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (DATA_MEAN + DATA_STD * torch.randn(n, 4, generator=generator, dtype=torch.float64)).view(n, 1, 2, 2)


def bound_check(
    model: ExactReverseDDGM, x: torch.Tensor, reps: int, seed: int
) -> tuple[bool, float, float, torch.Tensor]:
    """Does the Monte Carlo -ELBO (ddgm.likelihood.elbo_terms, ``reps`` draws per x) lie above
    -log p_model(x) on average? Returns (holds, mean gap, its SE, per-draw totals); the bound
    holds when the mean gap >= -4.5 SE."""
    x_rep = x.repeat(reps, 1, 1, 1)
    terms = elbo_terms(model, x_rep, chunk=100, generator=torch.Generator().manual_seed(seed))
    gap, se = _mean_se(terms.total - model.neg_log_marginal(x_rep))
    return gap >= -SE_TOL * se, gap, se, terms


def test_exact_model_is_a_proper_linear_gaussian_chain() -> None:
    """Sanity of the closed forms: with T = 1000 (abar_T ~ 4e-5) the model marginal is the data
    distribution to ~1e-4, and the reverse conditionals are what elbo_terms sees."""
    model = ExactReverseDDGM(1000)
    x = gaussian_data(16, seed=0)
    data_nll = (0.5 * torch.log(2 * math.pi * DATA_STD**2) + (x.flatten(1) - DATA_MEAN) ** 2 / (2 * DATA_STD**2)).sum(1)
    assert torch.allclose(model.neg_log_marginal(x), data_nll, atol=1e-3)
    assert model.diffusion.num_steps == 1000 and model.config.decoder == "continuous"


def test_negative_elbo_bounds_exact_nll_and_gap_shrinks_with_T() -> None:
    x = gaussian_data(64, seed=1)
    # reps per T: SE of the mean gap ~0.02 (T = 10, 100) and ~0.03 (T = 1000, 4096 draws)
    plan = {10: 256, 100: 96, 1000: 64}
    exact_gaps, mc_gaps, mc_ses = [], [], []
    for num_steps, reps in plan.items():
        model = ExactReverseDDGM(num_steps)
        nll = model.neg_log_marginal(x)
        prior, levels = model.expected_neg_elbo(x)
        exact_gap = prior + levels.sum(1) - nll
        # the bound in closed form: for every single x, including atypical ones
        assert torch.all(exact_gap >= -1e-9), exact_gap.min()
        far = torch.tensor([[-3.0, 3.0, 2.0, -2.0]], dtype=torch.float64).view(1, 1, 2, 2)
        prior_far, levels_far = model.expected_neg_elbo(far)
        assert prior_far + levels_far.sum(1) >= model.neg_log_marginal(far) - 1e-9

        holds, gap, se, terms = bound_check(model, x, reps, seed=num_steps)
        assert holds, (num_steps, gap, se)
        # elbo_terms is an unbiased estimate of the closed-form ELBO, term by term
        x_rep = x.repeat(reps, 1, 1, 1)
        diff, diff_se = _mean_se(terms.total - (prior + levels.sum(1)).repeat(reps))
        assert abs(diff) <= SE_TOL * diff_se, (num_steps, diff, diff_se)
        assert torch.allclose(terms.prior, model.diffusion.prior_kl(x_rep))
        assert torch.allclose(terms.prior[: x.shape[0]], prior, rtol=1e-5)
        if num_steps == 10:
            level_diff = terms.levels.double() - levels.repeat(reps, 1)
            level_se = level_diff.std(0) / math.sqrt(level_diff.shape[0])
            assert torch.all(level_diff.mean(0).abs() <= SE_TOL * level_se), (level_diff.mean(0), level_se)
        exact_gaps.append(exact_gap.mean().item())
        mc_gaps.append(gap)
        mc_ses.append(se)

    # closed form: 0.71, 0.24, 1.7e-5 nats
    assert exact_gaps[0] > exact_gaps[1] > exact_gaps[2] >= 0
    assert exact_gaps[2] < 1e-4
    # Monte Carlo: each estimated gap is within 4.5 SE of its closed form (SEs 0.02-0.03 nats),
    # so the estimates decrease too (the steps down, 0.47 and 0.24 nats, are > 5 combined SEs)
    for exact, gap, se in zip(exact_gaps, mc_gaps, mc_ses, strict=True):
        assert abs(gap - exact) <= SE_TOL * se, (exact_gaps, mc_gaps, mc_ses)
    assert mc_gaps[0] > mc_gaps[1] > mc_gaps[2], mc_gaps
    assert abs(mc_gaps[2]) <= SE_TOL * mc_ses[2], (mc_gaps[2], mc_ses[2])  # small at T = 1000


@pytest.mark.parametrize("num_steps", [10, 100])
def test_bound_check_detects_an_injected_posterior_error(num_steps: int) -> None:
    """The check is not vacuous: with the posterior variance beta_t in place of beta~_t, the
    'ELBO' lies below the exact log-likelihood (by ~5 and ~2.5 nats, > 50 SE) and the check fails."""
    x = gaussian_data(64, seed=2)
    broken = PosteriorVarianceIsBeta(num_steps)
    holds, gap, se, _ = bound_check(broken, x, reps=32, seed=3)
    assert not holds, (gap, se)
    assert gap < -1.0
    # the same check on the correct model with the same draws passes
    assert bound_check(ExactReverseDDGM(num_steps), x, reps=32, seed=3)[0]


# --- the estimators: random t, importance-sampled t, full chain --------------------------------


def _small_epsilon_model(num_steps: int = 20) -> DDGM:
    torch.manual_seed(0)
    config = ModelConfig(
        formulation="epsilon",
        image_shape=(1, 4, 4),
        num_levels=17,
        diffusion=ScheduleConfig("linear", num_steps, beta_start=1e-3, beta_end=0.2),
        network="mlp", hidden_dim=32, depth=2,
        variance="fixed_large",
    )
    model = build_model(config).double()
    with torch.no_grad():  # the output layer starts at zero: give the network something to say
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model


def _grid_images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, 1, 4, 4), generator=generator).double() * (2.0 / 16) - 1.0


@pytest.fixture(scope="module")
def small_model_elbo():
    """A fixed model, 8 fixed images, and the full -ELBO averaged over 4000 draws (elbo_terms)."""
    model = _small_epsilon_model()
    x = _grid_images(8, seed=1)
    terms = elbo_terms(model, x.repeat(500, 1, 1, 1), generator=torch.Generator().manual_seed(2))
    return model, x, terms


def _agree(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) <= SE_TOL * math.hypot(a[1], b[1])


def test_random_t_elbo_is_unbiased_uniform(small_model_elbo) -> None:
    model, x, terms = small_model_elbo
    full = _mean_se(terms.total)
    with torch.no_grad():
        out = random_t_elbo(model, x.repeat(5000, 1, 1, 1), UniformSampler(20), torch.Generator().manual_seed(3))
    # 40k draws of L_T + T L_{t-1}: SE ~0.4 nats on a -ELBO of ~77 nats
    estimate = _mean_se(out.loss)
    assert _agree(estimate, full), (estimate, full)
    assert out.t.min() == 1 and out.t.max() == 20
    assert torch.allclose(out.loss, model.diffusion.prior_kl(x.repeat(5000, 1, 1, 1)) + 20 * out.terms)


def test_random_t_elbo_is_unbiased_with_importance_sampling(small_model_elbo) -> None:
    model, x, terms = small_model_elbo
    full = _mean_se(terms.total)
    sampler = ImportanceSampler(20, history=10)
    per_level = terms.levels.mean(0)
    for _ in range(10):  # fill the loss history: p(t) ∝ sqrt(E[L_{t-1}^2]), far from uniform
        sampler.update(torch.arange(1, 21), per_level)
    probs = sampler.probabilities()
    assert sampler.warmed_up() and probs.max() / probs.min() > 5
    assert probs.sum() == pytest.approx(1.0)
    with torch.no_grad():
        out = random_t_elbo(model, x.repeat(5000, 1, 1, 1), sampler, torch.Generator().manual_seed(4))
    estimate = _mean_se(out.loss)
    assert _agree(estimate, full), (estimate, full)
    # the importance weights 1 / (T p(t)) are what keep it unbiased
    counts = torch.bincount(out.t, minlength=21)[1:].double() / out.t.numel()
    assert torch.allclose(counts, torch.from_numpy(probs), atol=0.01)


def test_full_elbo_objective_matches_elbo_terms(small_model_elbo) -> None:
    """full_elbo draws z_1..z_T along one forward chain, elbo_terms draws each z_t from q(z_t | x)
    independently: different latents, same expectation."""
    model, x, terms = small_model_elbo
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        out = compute_objective("full_elbo", model, x.repeat(500, 1, 1, 1), UniformSampler(20), generator)
    assert out.t is None and out.loss.shape == (4000,)
    assert _agree(_mean_se(out.loss), _mean_se(terms.total))


def test_full_elbo_is_differentiable_and_matches_per_level_terms() -> None:
    """With a shared generator the full objective is L_T plus the per-level terms of its own chain."""
    model = _small_epsilon_model(num_steps=5)
    x = _grid_images(3, seed=6)
    out = full_elbo(model, x, torch.Generator().manual_seed(7))
    latents = model.diffusion.forward_chain(x, torch.Generator().manual_seed(7))
    manual = model.diffusion.prior_kl(x)
    for step, z in enumerate(latents, start=1):
        manual = manual + model.loss_terms(x, z, torch.full((3,), step))
    assert torch.allclose(out.loss, manual)
    out.loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_elbo_terms_layout_and_bits_per_dim(small_model_elbo) -> None:
    _, _, terms = small_model_elbo
    assert terms.levels.shape == (4000, 20) and terms.prior.shape == (4000,)
    assert torch.allclose(terms.total, terms.prior + terms.decoder + terms.diffusion)
    assert torch.all(terms.levels[:, 1:] >= -1e-6)  # KLs
    assert torch.all(terms.decoder > 0)  # -log of a probability (discretized decoder)
    bpd = nats_to_bits_per_dim(terms.total.mean().item(), 16)
    assert bpd == pytest.approx(terms.total.mean().item() / (16 * math.log(2)))


def test_elbo_terms_chunking_does_not_change_the_result() -> None:
    model = _small_epsilon_model(num_steps=7)
    x = _grid_images(4, seed=8)
    a = elbo_terms(model, x, chunk=7, generator=torch.Generator().manual_seed(9))
    b = elbo_terms(model, x, chunk=7, generator=torch.Generator().manual_seed(9))
    c = elbo_terms(model, x, chunk=2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.levels, b.levels)
    assert c.levels.shape == a.levels.shape and torch.isfinite(c.levels).all()


# --- L_simple and the hybrid loss -----------------------------------------------------------


def _small_learned_range_model() -> DDGM:
    """A float64 epsilon MLP with learned variances on 1x4x4 images, T = 20, nonzero outputs."""
    torch.manual_seed(0)
    config = ModelConfig(
        formulation="epsilon", image_shape=(1, 4, 4), num_levels=17,
        diffusion=ScheduleConfig("linear", 20, beta_start=1e-3, beta_end=0.2),
        network="mlp", hidden_dim=32, depth=2, variance="learned_range",
    )
    model = build_model(config).double()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("uniform_mix", [0.001, 0.5, 1.0])
def test_importance_sampler_mixes_in_the_uniform_distribution(uniform_mix: float) -> None:
    """p(t) = (1 - m) sqrt(E[L_{t-1}^2]) / sum + m / T, and the weights 1 / (T p(t)) follow it."""
    sampler = ImportanceSampler(4, history=2, uniform_mix=uniform_mix)
    for _ in range(2):
        sampler.update(torch.arange(1, 5), torch.tensor([4.0, 2.0, 1.0, 1.0]))
    expected = (1 - uniform_mix) * np.array([4.0, 2.0, 1.0, 1.0]) / 8 + uniform_mix / 4
    np.testing.assert_allclose(sampler.probabilities(), expected)
    t, weights = sampler.sample(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights.double(), 1 / (4 * torch.from_numpy(expected)[t - 1]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="uniform_mix"):
        ImportanceSampler(4, uniform_mix=0.0)


def _skewed_importance_sampler(num_steps: int) -> ImportanceSampler:
    sampler = ImportanceSampler(num_steps, history=10)
    for _ in range(10):
        sampler.update(torch.arange(1, num_steps + 1), torch.linspace(1.0, 40.0, num_steps) ** 2)
    assert sampler.probabilities().max() / sampler.probabilities().min() > 100
    return sampler


@pytest.mark.parametrize("kind", ["uniform", "importance"])
def test_hybrid_and_simple_losses_from_their_pieces(kind: str) -> None:
    """L_hybrid = w(t) (L_simple + lambda T L_{t-1} / (D ln 2)), w(t) = 1 / (T p(t)): the VLB in bits
    per dimension (Nichol & Dhariwal's lambda = 0.001 is on bits/dim) and, under importance
    sampling, both parts reweighted so that the expectation is that of uniform t."""
    model, x, lam = _small_learned_range_model(), _grid_images(64, seed=5), 0.25
    sampler = UniformSampler(20) if kind == "uniform" else _skewed_importance_sampler(20)
    with torch.no_grad():
        hybrid = hybrid_loss(model, x, sampler, torch.Generator().manual_seed(6), vlb_weight=lam)
        simple = simple_loss(model, x, sampler, torch.Generator().manual_seed(6))
        generator = torch.Generator().manual_seed(6)  # the same draws, recomputed from the pieces
        t, weights = sampler.sample(x.shape[0], generator=generator)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        z_t = model.diffusion.q_sample(x, t, noise)
        mse = ((noise - model.network_output(z_t, t)[0]) ** 2).flatten(1).mean(1)
        vlb_bits_per_dim = 20 * model.loss_terms(x, z_t, t) / (16 * math.log(2.0))
    assert torch.equal(hybrid.t, t) and torch.equal(simple.t, t)
    assert torch.allclose(simple.loss, weights * mse, rtol=1e-12, atol=0)
    assert torch.allclose(hybrid.loss, weights * (mse + lam * vlb_bits_per_dim), rtol=1e-12, atol=0)
    assert (kind == "uniform") == bool((weights == 1).all())
