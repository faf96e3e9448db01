"""Samplers: DDIM(eta=1, all steps) is ancestral sampling, call counts with respacing, seeding,
the timestep subset and respaced diffusion, and argument validation."""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from ddgm.config import ModelConfig, ScheduleConfig
from ddgm.models import build_model
from ddgm.samplers import respaced_diffusion, sample, sample_ancestral, sample_ddim, timestep_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def _epsilon_model(schedule: ScheduleConfig, variance: str = "fixed_small", seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(
        formulation="epsilon",
        image_shape=(1, 2, 2),
        diffusion=schedule,
        network="mlp", hidden_dim=32, depth=2,
        variance=variance,
    )
    model = build_model(config)
    with torch.no_grad():  # the output layer starts at zero: make eps_theta non-trivial
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.3)
    return model.eval()


SHORT = ScheduleConfig("linear", 20, beta_start=1e-3, beta_end=0.2)


@pytest.fixture(scope="module")
def model():
    return _epsilon_model(SHORT)


@pytest.fixture(scope="module")
def article_model():
    torch.manual_seed(0)
    config = ModelConfig(
        formulation="article",
        image_shape=(1, 2, 2),
        diffusion=ScheduleConfig("constant", 5, beta=0.9),
        network="mlp", hidden_dim=16, depth=1,
        decoder="continuous",
        variance="fixed_large",
    )
    return build_model(config).eval()


@contextmanager
def count_calls(*modules: torch.nn.Module):
    """Yield a list with one forward-call counter per module (forward hooks, removed on exit)."""
    calls = [0] * len(modules)
    handles = [
        module.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, module in enumerate(modules)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# --- DDIM with eta = 1 over every step is ancestral sampling with variance beta~_t -----------


@pytest.mark.parametrize(
    "schedule",
    [SHORT, ScheduleConfig("linear", 1000), ScheduleConfig("cosine", 50)],
    ids=["linear20", "linear1000", "cosine50"],
)
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_eta1_all_steps_equals_ancestral_for_the_same_seed(schedule: ScheduleConfig, clip: bool) -> None:
    """Both start from the same z_T and draw one noise tensor per step except the last, in the
    same order, and sqrt(abar_{t-1}) x^ + sqrt(1 - abar_{t-1} - beta~_t) eps^ = mu~_t(x^, z_t):
    the outputs agree up to float32 round-off.

    Clipped, x in [-1, 1]: within 2e-5 (measured <= 5e-6; DDIM coefficients formed from the
    float32 abar table were off by 5e-5 at T = 1000). Unclipped, the random network's x^ grows
    to ~3e4 along the chain and amplifies round-off: relative 1e-4 (2e-3 over 1000 steps)."""
    model = _epsilon_model(schedule)
    n = 200
    a = sample_ancestral(model, n, generator=torch.Generator().manual_seed(1), clip_denoised=clip).images
    generator = torch.Generator().manual_seed(1)
    b = sample_ddim(model, n, schedule.num_steps, eta=1.0, generator=generator, clip_denoised=clip).images
    if clip:
        assert a.abs().max() <= 1 and torch.all((a - b).abs() <= 2e-5), (a - b).abs().max()
    else:
        tol = 2e-3 if schedule.num_steps == 1000 else 1e-4
        scale = 1.0 + a.abs()
        assert torch.all((a - b).abs() <= tol * scale), ((a - b).abs() / scale).max()


def test_ddim_eta1_matches_ancestral_in_distribution(model) -> None:
    """Independent seeds, 4000 samples each: per-dimension means and variances agree within
    5 standard errors of their difference (SE of a sample variance from the 4th moment)."""
    n = 4000
    a = sample_ancestral(model, n, generator=torch.Generator().manual_seed(2)).images.flatten(1).double()
    b = sample_ddim(model, n, 20, eta=1.0, generator=torch.Generator().manual_seed(3)).images.flatten(1).double()

    def moments(v: torch.Tensor):
        centred = v - v.mean(0)
        var = centred.pow(2).mean(0)
        return v.mean(0), var, torch.sqrt(var / n), torch.sqrt((centred.pow(4).mean(0) - var**2) / n)

    mean_a, var_a, se_mean_a, se_var_a = moments(a)
    mean_b, var_b, se_mean_b, se_var_b = moments(b)
    assert torch.all((mean_a - mean_b).abs() <= 5 * torch.hypot(se_mean_a, se_mean_b))
    assert torch.all((var_a - var_b).abs() <= 5 * torch.hypot(se_var_a, se_var_b))
    assert torch.all(var_a > 1e-3)  # not a degenerate distribution


def test_ddim_eta0_is_deterministic_given_z_T(model) -> None:
    """eta = 0 draws no noise after z_T: the trajectory is a function of z_T alone."""
    out = sample_ddim(model, 8, 10, eta=0.0, generator=torch.Generator().manual_seed(4), keep_trajectory=True)
    generator = torch.Generator().manual_seed(4)
    z_T = torch.randn((8, 1, 2, 2), generator=generator)
    assert torch.equal(out.trajectory[0], z_T)
    # the generator was not advanced further: the next draw is the one after z_T
    again = sample_ddim(model, 8, 10, eta=0.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.images, again.images)
    assert len(out.trajectory) == 11


# --- network calls --------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5, 13, 20])
def test_respaced_samplers_call_the_network_once_per_step(model, steps: int) -> None:
    for draw in (
        lambda: sample_ddim(model, 3, steps, generator=torch.Generator().manual_seed(0)),
        lambda: sample_ancestral(model, 3, steps, generator=torch.Generator().manual_seed(0)),
        lambda: sample(model, 3, "ddim", steps, eta=0.5, generator=torch.Generator().manual_seed(0)),
        lambda: sample(model, 3, "ancestral", steps, generator=torch.Generator().manual_seed(0)),
    ):
        with count_calls(model.network) as calls:
            draw()
        assert calls == [steps]


def test_full_ancestral_sampling_calls_the_network_T_times(model) -> None:
    with count_calls(model.network) as calls:
        out = sample_ancestral(model, 3, generator=torch.Generator().manual_seed(0), keep_trajectory=True)
    assert calls == [20]
    assert len(out.trajectory) == 21 and torch.equal(out.trajectory[-1], out.images)


def test_article_model_samples_every_level_once(article_model) -> None:
    with count_calls(*article_model.levels, article_model.decoder) as calls:
        out = sample_ancestral(article_model, 4, generator=torch.Generator().manual_seed(0), keep_trajectory=True)
    assert calls == [1] * 5
    assert out.images.shape == (4, 1, 2, 2) and out.images.abs().max() <= 1  # the decoder's own tanh
    assert len(out.trajectory) == 6


def test_article_sampling_applies_no_tanh_to_latent_means(article_model) -> None:
    """The reference code squashed every reverse mean with tanh at sampling time only; here the
    latents follow the same p(z_{t-1} | z_t) as in training."""
    level = article_model.levels[-1]  # p(z_{T-1} | z_T)
    with torch.no_grad():
        saved = level.output.bias.clone()
        level.output.bias[:4] = 50.0  # mean of z_{T-1} = ~50 (first half of the output)
        level.output.bias[4:] = -20.0  # tiny variance
    try:
        out = sample_ancestral(article_model, 4, generator=torch.Generator().manual_seed(0), keep_trajectory=True)
        z_prev = out.trajectory[1]
        mean, _ = article_model.reverse_mean_logvar(out.trajectory[0], torch.full((4,), 5))
        assert torch.allclose(z_prev, mean, atol=1e-3)
        assert z_prev.min() > 10
    finally:
        with torch.no_grad():
            level.output.bias.copy_(saved)


# --- seeding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "draw",
    [
        lambda m, g: sample_ancestral(m, 6, generator=g),
        lambda m, g: sample_ancestral(m, 6, 7, generator=g),
        lambda m, g: sample_ddim(m, 6, 7, eta=0.0, generator=g),
        lambda m, g: sample_ddim(m, 6, 20, eta=1.0, generator=g),
    ],
    ids=["ancestral", "ancestral-respaced", "ddim-eta0", "ddim-eta1"],
)
def test_same_seed_same_samples_different_seed_different(model, draw) -> None:
    first = draw(model, torch.Generator().manual_seed(11)).images
    second = draw(model, torch.Generator().manual_seed(11)).images
    other = draw(model, torch.Generator().manual_seed(12)).images
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_article_sampling_is_seeded(article_model) -> None:
    first = sample_ancestral(article_model, 5, generator=torch.Generator().manual_seed(1)).images
    second = sample_ancestral(article_model, 5, generator=torch.Generator().manual_seed(1)).images
    other = sample_ancestral(article_model, 5, generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(first, second) and not torch.allclose(first, other)


# --- timestep subsets and respacing -----------------------------------------------------------


def test_timestep_subset_small_T_exhaustive() -> None:
    for num_steps in range(1, 80):
        assert timestep_subset(num_steps, 1) == [num_steps]
        for count in range(2, num_steps + 1):
            steps = timestep_subset(num_steps, count)
            assert len(steps) == count and len(set(steps)) == count, (num_steps, count, steps)
            assert steps[0] == 1 and steps[-1] == num_steps and steps == sorted(steps)


@pytest.mark.parametrize("count", [2, 3, 10, 25, 50, 100, 250, 333, 500, 999, 1000])
def test_timestep_subset_T1000(count: int) -> None:
    steps = timestep_subset(1000, count)
    assert len(set(steps)) == count and steps[0] == 1 and steps[-1] == 1000
    gaps = np.diff(steps)
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_respaced_diffusion_with_every_step_is_the_original(model) -> None:
    original = model.diffusion
    spaced = respaced_diffusion(original, list(range(1, 21)))
    assert spaced.num_steps == 20
    np.testing.assert_allclose(spaced.abar64, original.abar64, rtol=1e-14, atol=0)
    for name, table in original.named_buffers():
        assert torch.allclose(getattr(spaced, name), table, rtol=1e-6, atol=1e-12), name


def test_respaced_diffusion_keeps_abar_on_the_subset(model) -> None:
    steps = [1, 4, 9, 15, 20]
    spaced = respaced_diffusion(model.diffusion, steps)
    np.testing.assert_allclose(spaced.abar64, model.diffusion.abar64[[0, *steps]], rtol=1e-13)
    # beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}
    abar = model.diffusion.abar64
    expected = [1 - abar[1]] + [1 - abar[b] / abar[a] for a, b in itertools.pairwise(steps)]
    np.testing.assert_allclose(spaced.beta[1:].double().numpy(), expected, rtol=1e-6)


def test_respaced_diffusion_over_merged_pure_noise_levels() -> None:
    """Merging levels whose betas are clipped at 0.999 makes abar_{s_i} / abar_{s_{i-1}} < 2^-53, so
    1 - ratio rounds to 1; the respaced beta stays just below 1 and the posterior stays finite.
    (Ho's linear schedule scaled to T=10 does this when respaced to 2 steps.)"""
    from ddgm.diffusion import GaussianDiffusion

    original = GaussianDiffusion(np.array([0.01] + [0.999] * 9))
    assert 1.0 - original.abar64[10] / original.abar64[1] == 1.0  # the rounding this guards against
    spaced = respaced_diffusion(original, [1, 10])
    assert spaced.num_steps == 2 and spaced.abar64[2] < 1e-15
    assert float(spaced.beta[1]) == pytest.approx(0.01) and 0.999 < float(spaced.beta[2]) <= 1.0
    x, z = torch.rand(4, 3) * 2 - 1, torch.randn(4, 3)
    mean, log_var = spaced.q_posterior(x, z, torch.full((4,), 2))
    assert torch.isfinite(mean).all() and torch.isfinite(log_var).all()
    torch.testing.assert_close(mean, math.sqrt(0.99) * x)  # z_T carries nothing about z_1 any more


# --- validation -----------------------------------------------------------------------------


def test_unknown_sampler_name_raises(model) -> None:
    with pytest.raises(ValueError, match="sampler"):
        sample(model, 2, "euler")


@pytest.mark.parametrize("steps", [0, -1, 21, 2.5, True])
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_bad_number_of_steps_raises(model, sampler: str, steps) -> None:
    with pytest.raises(ValueError, match="num_sample_steps"):
        sample(model, 2, sampler, steps)
    with pytest.raises(ValueError, match="num_sample_steps"):
        (sample_ancestral(model, 2, steps) if sampler == "ancestral" else sample_ddim(model, 2, steps))


@pytest.mark.parametrize("eta", [-0.1, float("nan"), "1"])
def test_bad_eta_raises(model, eta) -> None:
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(model, 2, 5, eta=eta)


def test_ddim_and_respacing_need_the_epsilon_model(article_model) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        sample_ddim(article_model, 2, 5)
    with pytest.raises(ValueError, match="epsilon"):
        sample(article_model, 2, "ddim")
    with pytest.raises(ValueError, match="epsilon"):
        sample_ancestral(article_model, 2, 3)
    assert sample_ancestral(article_model, 2, 5).images.shape == (2, 1, 2, 2)  # all T levels is fine


def test_sample_dispatch_defaults_to_all_steps(model) -> None:
    for sampler in ("ddim", "ancestral"):
        with count_calls(model.network) as calls:
            out = sample(model, 2, sampler, generator=torch.Generator().manual_seed(0))
        assert calls == [20] and math.isfinite(out.images.sum().item())
