"""Sample-quality evaluation on the bundled sklearn 8x8 digits (K = 17): train 1000 / val 350 / test 447."""

from __future__ import annotations

import math
import re

import pytest
import torch
from sklearn.datasets import load_digits

from ddgm.evaluation import (
    FeatureClassifier,
    PixelCategorical,
    accuracy,
    frechet_distance,
    inception_score,
    nearest_neighbour_distance,
    train_classifier,
    uniform_bits_per_dim,
)
from ddgm.evaluation.classifier import random_shift

K = 17


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.uint8).unsqueeze(1)  # [1797, 1, 8, 8], levels 0..16
    labels = torch.tensor(data.target, dtype=torch.int64)
    return {
        "train": images[:1000],
        "train_y": labels[:1000],
        "val": images[1000:1350],
        "val_y": labels[1000:1350],
        "test": images[1350:],
        "test_y": labels[1350:],
    }


@pytest.fixture(scope="module")
def classifier(digits) -> FeatureClassifier:
    return train_classifier(digits["train"], digits["train_y"], K, seed=0)


@pytest.fixture(scope="module")
def fakes(digits) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    n = digits["test"].shape[0]
    return {
        "pixel": PixelCategorical.fit(digits["train"], K).sample(n, generator),
        "noise": torch.randint(0, K, (n, 1, 8, 8), generator=generator).to(torch.uint8),
    }


# classifier


def test_classifier_accuracy_on_held_out_digits(classifier, digits):
    assert accuracy(classifier, digits["test"], digits["test_y"], K) > 0.90
    assert not classifier.training


def test_classifier_shapes(classifier):
    x = torch.zeros(5, 1, 8, 8)
    assert classifier(x).shape == (5, 10)
    assert classifier.features(x).shape == (5, 64)
    with pytest.raises(ValueError, match="x_unit"):
        classifier.features(torch.zeros(5, 1, 9, 9))


def test_training_is_deterministic_and_keeps_global_rng(digits):
    state = torch.get_rng_state()
    first, second = (
        train_classifier(digits["train"][:200], digits["train_y"][:200], K, epochs=1, seed=3) for _ in range(2)
    )
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_validation_selection_runs(digits):
    model = train_classifier(
        digits["train"][:200], digits["train_y"][:200], K, num_classes=10, epochs=2,
        val_images=digits["val"], val_labels=digits["val_y"],
    )
    assert model.num_classes == 10


def test_random_shift_moves_content_by_at_most_one_pixel():
    x = -torch.ones(64, 1, 6, 6)
    x[:, :, 2:4, 2:4] = 1.0
    shifted = random_shift(x, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # the blob never leaves the image
    assert not torch.equal(shifted, x)
    assert torch.equal(shifted[:, :, 1:5, 1:5].sum(dim=(1, 2, 3)), x[:, :, 1:5, 1:5].sum(dim=(1, 2, 3)))


# Frechet distance


def test_frechet_distance_of_a_set_to_itself_is_zero(classifier, digits):
    assert frechet_distance(classifier, digits["test"], digits["test"], K) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_ranks_real_pixel_model_and_noise(classifier, digits, fakes):
    real = frechet_distance(classifier, digits["val"], digits["test"], K)
    pixel = frechet_distance(classifier, fakes["pixel"], digits["test"], K)
    noise = frechet_distance(classifier, fakes["noise"], digits["test"], K)
    assert 0.0 < real and 4 * real < pixel and 1.25 * pixel < noise


def test_frechet_distance_is_symmetric_and_non_negative(classifier, digits, fakes):
    for fake in (digits["val"], fakes["pixel"], fakes["noise"]):
        forward = frechet_distance(classifier, fake, digits["test"], K)
        backward = frechet_distance(classifier, digits["test"], fake, K)
        assert forward >= 0.0 and backward >= 0.0
        assert forward == pytest.approx(backward, rel=1e-6)


# Inception Score and memorisation


def test_inception_score_of_real_digits_beats_noise(classifier, digits, fakes):
    real = inception_score(classifier, digits["test"], K)
    noise = inception_score(classifier, fakes["noise"], K)
    assert 1.0 <= noise < real <= 10.0


def test_inception_score_splits_average_their_own_scores(classifier, digits):
    """splits=5: the mean of the IS of 5 contiguous groups, each with its own marginal p(y)."""
    images = digits["test"]
    groups = images.tensor_split(5)
    expected = sum(inception_score(classifier, group, K) for group in groups) / 5
    assert inception_score(classifier, images, K, splits=5) == pytest.approx(expected, rel=1e-12)
    # group-wise marginals differ from the pooled one, so the two estimates differ
    assert inception_score(classifier, images, K, splits=5) != pytest.approx(inception_score(classifier, images, K))


def test_inception_score_of_one_repeated_image_is_one(classifier, digits):
    copies = digits["test"][:1].expand(20, -1, -1, -1)
    assert inception_score(classifier, copies, K) == pytest.approx(1.0, abs=1e-9)


def test_nearest_neighbour_distance_detects_copies(digits):
    assert nearest_neighbour_distance(digits["train"][:100], digits["train"], K) == 0.0
    assert nearest_neighbour_distance(digits["test"], digits["train"], K) > 0.0


def test_nearest_neighbour_distance_value():
    train = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    samples = torch.full((2, 1, 4, 4), K - 1, dtype=torch.uint8)  # every pixel 2 away in [-1, 1]
    assert nearest_neighbour_distance(samples, train, K) == pytest.approx(2.0 * math.sqrt(16))


# likelihood baselines


def test_pixel_categorical_bits_per_dim_on_digits(digits):
    model = PixelCategorical.fit(digits["train"], K, alpha=1.0)
    assert 2.3 < model.log_prob_bits_per_dim(digits["test"]) < 2.5  # measured 2.400
    assert uniform_bits_per_dim(K) == pytest.approx(4.0875, abs=1e-4)


def test_uniform_pixel_categorical_matches_uniform_bits():
    model = PixelCategorical(torch.full((1, 2, 2, K), 1.0 / K))
    levels = torch.randint(0, K, (7, 1, 2, 2), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert model.log_prob_bits_per_dim(levels) == pytest.approx(math.log2(K))


def test_pixel_categorical_samples_follow_fitted_frequencies(digits):
    model = PixelCategorical.fit(digits["train"], K)
    samples = model.sample(4000, torch.Generator().manual_seed(1))
    again = model.sample(4000, torch.Generator().manual_seed(1))
    assert samples.dtype == torch.uint8 and samples.shape == (4000, 1, 8, 8)
    assert torch.equal(samples, again)
    frequencies = torch.nn.functional.one_hot(samples.long(), K).double().mean(dim=0)
    assert (frequencies - model.probs).abs().max() < 0.05


# bad input


# name: (what the message must say, the call)
BAD_CALLS = {
    "float images": ("images must hold integer levels", lambda c, d: accuracy(c, d["test"].float(), d["test_y"], K)),
    "label count": ("labels must be a 1-D tensor with one label per image",
                    lambda c, d: accuracy(c, d["test"], d["test_y"][:-1], K)),
    "levels above K-1": ("images must lie in 0..3", lambda c, d: accuracy(c, d["test"], d["test_y"], 4)),
    "fid image shape": ("real_levels must have images of shape",
                        lambda c, d: frechet_distance(c, d["test"][:, :, :7], d["test"], K)),
    "fid single image": ("real_levels needs at least 2 images",
                         lambda c, d: frechet_distance(c, d["test"][:1], d["test"], K)),
    "is splits": ("splits must be an integer in 1..N", lambda c, d: inception_score(c, d["test"], K, splits=0)),
    "is 3-d": ("levels must have shape", lambda c, d: inception_score(c, d["test"][0], K)),
    "nn shapes": ("train_levels must have images of shape",
                  lambda c, d: nearest_neighbour_distance(d["test"], d["train"][:, :, :4], K)),
    "num_classes too small": ("num_classes must be an integer > max",
                              lambda c, d: train_classifier(d["test"], d["test_y"], K, num_classes=5)),
    "val labels missing": ("val_images and val_labels must be given together",
                           lambda c, d: train_classifier(d["test"], d["test_y"], K, val_images=d["val"])),
    "epochs": ("epochs must be a positive integer", lambda c, d: train_classifier(d["test"], d["test_y"], K, epochs=0)),
    "alpha": ("alpha must be a positive number", lambda c, d: PixelCategorical.fit(d["test"], K, alpha=0.0)),
    "K < 2": ("num_levels", lambda c, d: PixelCategorical.fit(d["test"], 1)),
    "probs sum": ("probs must sum to 1", lambda c, d: PixelCategorical(torch.full((1, 2, 2, K), 0.5))),
    "bits shape": ("levels must have images of shape",
                   lambda c, d: PixelCategorical.fit(d["test"], K).log_prob_bits_per_dim(d["test"][:, :, :4])),
    "sample n": ("n must be a positive integer",
                 lambda c, d: PixelCategorical.fit(d["test"], K).sample(0, torch.Generator())),
    "num_classes": ("num_classes must be an integer >= 2", lambda c, d: FeatureClassifier(1, 8, num_classes=1)),
}


@pytest.mark.parametrize(("message", "call"), BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_inputs_raise_value_error_naming_the_argument(message, call, classifier, digits):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(classifier, digits)


# the reported likelihood


def test_reported_val_likelihood_uses_noise_the_checkpoint_selection_never_saw(digits_shards):
    """With train.seed == evaluate.seed, the evaluate stage's val -ELBO still draws other z_t than the
    training loop's validation (which picks the best checkpoint), so it is not biased low by that choice."""
    from ddgm.config import ModelConfig
    from ddgm.models import build_model
    from ddgm.training.validation import split_elbo
    from pipeline.evaluate import likelihood_metrics
    from pipeline.params import params_from_dict

    params = params_from_dict({
        "diffusion": {"num_steps": 10},
        "model": {"network": "mlp", "hidden_dim": 32, "depth": 1, "variance": "fixed_large"},
        "data": {"out_dir": str(digits_shards)},
        "train": {"seed": 0},
        "evaluate": {"batch_size": 350, "chunk": 10, "seed": 0},
    })
    torch.manual_seed(0)
    model = build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), K)).eval()
    with torch.no_grad():  # an output layer that is not all zeros, so the -ELBO depends on z_t
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    selection = split_elbo(model, str(digits_shards), "val", 350, 10, params.train.seed).bits_per_dim()["total"]
    reported = likelihood_metrics(model, params)
    assert reported["val/total_bpd"] != selection
    assert reported["val/total_bpd"] == pytest.approx(selection, rel=0.02)  # the same model: Monte Carlo noise only
    assert likelihood_metrics(model, params)["val/total_bpd"] == reported["val/total_bpd"]  # seeded
    with pytest.raises(ValueError, match="noise"):
        split_elbo(model, str(digits_shards), "val", 350, 10, 0, noise="test")


@pytest.mark.parametrize(("sampler", "expected"), [
    ("ancestral", [("ancestral", 2), ("ancestral", 10)]),
    ("ddim", [("ddim", 2), ("ddim", 10), ("ancestral", 10)]),
])
def test_sampler_comparison_rows_once_each_and_the_full_ancestral_chain(sampler, expected, classifier, digits):
    """The configured sampler at each comparison step count (those <= T), then ancestral over all T
    levels unless that row is already there."""
    from ddgm.config import ModelConfig
    from ddgm.models import build_model
    from pipeline.evaluate import sampler_comparison
    from pipeline.params import params_from_dict

    params = params_from_dict({
        "diffusion": {"num_steps": 10},
        "model": {"network": "mlp", "hidden_dim": 16, "depth": 1},
        "sample": {"sampler": sampler},
        "evaluate": {"comparison_steps": [2, 10, 50], "comparison_samples": 20},
    })
    model = build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), K)).eval()
    rows = sampler_comparison(model, params, classifier, digits["test"])
    assert [(row["sampler"], row["steps"]) for row in rows] == expected
    assert all(math.isfinite(row["fd_vs_test"]) and row["seconds"] >= 0 for row in rows)
