"""Models: the article's per-level networks (registered, correctly paired, trained), the Ho et al.
model, config validation, and safetensors save/load."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.datasets import load_digits

import ddgm.serialization as serialization
from ddgm.config import ModelConfig, ScheduleConfig
from ddgm.likelihood import elbo_terms, nats_to_bits_per_dim
from ddgm.models import ArticleDDGM, EpsilonDDGM, build_model
from ddgm.nets.unet import AttentionBlock
from ddgm.objectives import compute_objective, full_elbo
from ddgm.serialization import load_config, load_model, save_model
from ddgm.timestep_sampler import UniformSampler, make_timestep_sampler
from pipeline.params import load_params, params_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def article_config(**overrides) -> ModelConfig:
    """The article's setup: T = 5 levels, constant beta = 0.9, one MLP per level, a tanh decoder
    with unit variance (continuous), on 8x8 digits with K = 17 levels."""
    values = dict(
        formulation="article",
        image_shape=(1, 8, 8),
        num_levels=17,
        diffusion=ScheduleConfig("constant", 5, beta=0.9),
        network="mlp", hidden_dim=64, depth=2,
        decoder="continuous",
        variance="fixed_large",
    )
    values.update(overrides)
    return ModelConfig(**values)


def epsilon_config(kind: str = "mlp", variance: str = "fixed_large", num_steps: int = 100, **overrides) -> ModelConfig:
    network = (
        dict(network="mlp", hidden_dim=128, depth=2)
        if kind == "mlp"
        else dict(network="unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                  dropout=0.0)
    )
    values = dict(
        formulation="epsilon",
        image_shape=(1, 8, 8),
        num_levels=17,
        diffusion=ScheduleConfig("linear", num_steps, beta_start=1e-3, beta_end=0.2),
        variance=variance,
        **network,
    )
    values.update(overrides)
    return ModelConfig(**values)


def perturb_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits: pixels 0..16 (K = 17) -> x = 2 v / 16 - 1, [N, 1, 8, 8]; 1500 train, 256 test."""
    values = torch.from_numpy(load_digits().images).float()
    x = (2.0 * values / 16.0 - 1.0).unsqueeze(1)
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    return x[:1500], x[1500:1756]


def _train(model, objective: str, data: torch.Tensor, steps: int, optimizer, batch: int = 64) -> None:
    generator = torch.Generator().manual_seed(1)
    sampler = UniformSampler(model.num_steps)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=generator)]
        loss = compute_objective(objective, model, x, sampler, generator).loss.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _neg_elbo(model, x: torch.Tensor) -> float:
    return elbo_terms(model, x, generator=torch.Generator().manual_seed(0)).total.mean().item()


# --- the article's model --------------------------------------------------------------------


def test_article_networks_are_registered_submodules() -> None:
    """Defect 1 of the reference code: networks in a plain list are invisible to the optimizer."""
    model = build_model(article_config())
    assert isinstance(model, ArticleDDGM) and isinstance(model.levels, torch.nn.ModuleList)
    assert len(model.levels) == 4  # p(z_{t-1} | z_t) for t = 2..5; the decoder is p(x | z_1)
    params = {id(p) for p in model.parameters()}
    for net in [*model.levels, model.decoder]:
        assert all(id(p) in params for p in net.parameters())
    keys = model.state_dict().keys()
    assert {f"levels.{i}.output.weight" for i in range(4)} <= set(keys) and "decoder.output.weight" in keys


def test_article_every_level_gets_gradient_from_full_elbo(digits) -> None:
    torch.manual_seed(0)
    model = build_model(article_config())
    out = full_elbo(model, digits[0][:32], torch.Generator().manual_seed(0))
    out.loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_article_level_t_network_is_scored_against_z_t_minus_1(digits) -> None:
    """Defect 3 of the reference code paired networks with the wrong latents. Here levels[t-2]
    parameterises p(z_{t-1} | z_t) and enters L_{t-1} only (column t-1 of elbo_terms); the
    decoder enters L_0 only."""
    torch.manual_seed(0)
    model = build_model(article_config())
    x = digits[1][:8]
    base = elbo_terms(model, x, generator=torch.Generator().manual_seed(3)).levels
    for index, net in enumerate([model.decoder, *model.levels]):  # column 0 = decoder, k = levels[k-1]
        with torch.no_grad():
            saved = net.output.bias.clone()
            net.output.bias.add_(0.5)
        changed = elbo_terms(model, x, generator=torch.Generator().manual_seed(3)).levels
        with torch.no_grad():
            net.output.bias.copy_(saved)
        moved = (changed - base).abs().amax(0) > 1e-6
        assert moved.tolist() == [k == index for k in range(5)], (index, moved)


def test_article_model_trains_on_digits_and_every_level_changes(digits) -> None:
    """Adamax, lr 1e-3, 300 full-ELBO steps of 64 digits: the exact -ELBO of 256 held-out digits
    (continuous decoder, as in the article) drops from ~100 to ~76 nats; every network moved."""
    train, test = digits
    torch.manual_seed(0)
    model = build_model(article_config())
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = _neg_elbo(model, test)
    _train(model, "full_elbo", train, 300, torch.optim.Adamax(model.parameters(), lr=1e-3))
    after = _neg_elbo(model, test)
    assert after < before - 10, (before, after)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), initial[name]), f"{name} never trained"


def test_ho_model_trains_with_random_t_and_its_bits_per_dim_drop(digits) -> None:
    """EpsilonDDGM (MLP, T = 100), Adam 1e-3, 300 random-t ELBO steps: the exact -ELBO of 256
    held-out digits with the discretized decoder drops from ~13.6 to ~5.2 bits/dim."""
    train, test = digits
    torch.manual_seed(0)
    model = build_model(epsilon_config())
    assert isinstance(model, EpsilonDDGM) and model.config.decoder == "discretized"
    before = nats_to_bits_per_dim(_neg_elbo(model, test), 64)
    _train(model, "random_t_elbo", train, 300, torch.optim.Adam(model.parameters(), lr=1e-3))
    after = nats_to_bits_per_dim(_neg_elbo(model, test), 64)
    assert after < before - 3, (before, after)
    assert after < 8  # for scale: a uniform model is log2(17) = 4.09 bits/dim


# --- objectives and inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [article_config(), epsilon_config(), epsilon_config("unet", "learned_range", 10)],
    ids=["article", "eps-mlp", "eps-unet"],
)
def test_wrong_input_shape_raises(config: ModelConfig) -> None:
    model = build_model(config)
    for bad in (torch.zeros(2, 1, 4, 4), torch.zeros(2, 64), torch.zeros(2, 3, 8, 8)):
        with pytest.raises(ValueError, match="shape"):
            compute_objective("full_elbo", model, bad, UniformSampler(model.num_steps))
        with pytest.raises(ValueError, match="shape"):
            elbo_terms(model, bad)
    if isinstance(model, EpsilonDDGM):
        with pytest.raises(ValueError, match="shape"):
            model.network_output(torch.zeros(2, 1, 4, 4), torch.ones(2, dtype=torch.long))


def test_objective_names_and_requirements() -> None:
    x = torch.zeros(2, 1, 8, 8)
    article = build_model(article_config())
    eps = build_model(epsilon_config(num_steps=10))
    learned = build_model(epsilon_config(variance="learned_range", num_steps=10))
    with pytest.raises(ValueError, match="objective"):
        compute_objective("elbo", eps, x, UniformSampler(10))
    for name in ("simple", "hybrid"):
        with pytest.raises(ValueError, match="epsilon"):
            compute_objective(name, article, x, UniformSampler(5))
    with pytest.raises(ValueError, match="learned_range"):
        compute_objective("hybrid", eps, x, UniformSampler(10))
    for name, model in (("simple", eps), ("hybrid", learned), ("random_t_elbo", article), ("full_elbo", learned)):
        out = compute_objective(name, model, x, UniformSampler(model.num_steps), torch.Generator().manual_seed(0))
        assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
    with pytest.raises(ValueError, match="timestep_sampler"):
        make_timestep_sampler("stratified", 10)


# --- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"num_levels": 1}, "num_levels"),
        ({"num_levels": 0}, "num_levels"),
        ({"num_levels": 16.0}, "num_levels"),
        ({"formulation": "sohl-dickstein"}, "formulation"),
        ({"variance": "learned"}, "variance"),
        ({"decoder": "bernoulli"}, "decoder"),
        ({"image_shape": (8, 8)}, "image_shape"),
        ({"image_shape": (1, 0, 8)}, "image_shape"),
        ({"network": "transformer"}, "model.network"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"channel_mults": ()}, "model.channel_mults"),
    ],
)
def test_bad_config_values_raise_naming_the_parameter(overrides: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        epsilon_config(**overrides)


def test_continuous_decoder_with_learned_variance_is_refused_naming_both_keys() -> None:
    """-log N(x | mu, sigma^2) has no lower bound once sigma^2 is learned: refused up front."""
    with pytest.raises(ValueError, match=r"model\.decoder 'continuous'.*model\.variance 'learned_range'"):
        epsilon_config(variance="learned_range", decoder="continuous")
    with pytest.raises(ValueError, match=r"model\.decoder 'continuous'.*model\.variance 'learned_range'"):
        params_from_dict({"model": {"variance": "learned_range", "decoder": "continuous"}})
    for variance in ("fixed_large", "fixed_small"):  # a fixed variance bounds the density
        assert epsilon_config(variance=variance, decoder="continuous").decoder == "continuous"
    assert params_from_dict({"model": {"variance": "learned_range", "decoder": "discretized"}}).model.decoder


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"attention_resolutions": [0]}, "model.attention_resolutions"),
        ({"attention_resolutions": [16, -8]}, "model.attention_resolutions"),
        ({"norm_groups": 0}, "model.norm_groups"),
        ({"attention": True}, "attention"),  # the old key was replaced by attention_resolutions
    ],
)
def test_bad_unet_params_raise_naming_the_key(model: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        params_from_dict({"model": model})


def test_unet_params_reach_the_network() -> None:
    values = {"model": {"base_channels": 16, "channel_mults": [1, 2, 2], "attention_resolutions": [8, 4],
                        "norm_groups": 4, "variance": "fixed_small"}}
    params = params_from_dict(values)
    model = build_model(ModelConfig.build(params.model, params.diffusion, (3, 16, 16), 256))
    unet = model.network
    assert unet.attention_resolutions == (8, 4) and unet.norm_out.num_groups == 4
    assert model.config.attention_resolutions == (8, 4)


def test_the_default_params_model_keeps_its_size() -> None:
    """params.yaml's digits model: a 2-level U-Net without self-attention, learned variances, 634,562 parameters."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    model = build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17))
    assert sum(p.numel() for p in model.parameters()) == 634_562
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())


def old_layout(config: ModelConfig) -> dict:
    """``config`` as model.json files held it before the model and diffusion sections became the config:
    the schedule as {name, num_steps, params} and the network's settings under ``network`` with ``kind``."""
    values = json.loads(json.dumps(config.to_dict()))
    diffusion = values.pop("diffusion")
    network = {name: values.pop(name) for name in ("hidden_dim", "depth", "base_channels", "channel_mults",
                                                   "num_res_blocks", "attention_resolutions", "dropout", "norm_groups")}
    values["network"] = {"kind": values.pop("network"), **network}
    values["schedule"] = {"name": diffusion.pop("schedule"), "num_steps": diffusion.pop("num_steps"),
                          "params": {k: v for k, v in diffusion.items() if v is not None}}
    return values


@pytest.mark.parametrize(
    "config", [epsilon_config("unet", "learned_range", 10), article_config()], ids=["unet", "article"]
)
def test_a_model_file_of_the_old_layout_still_loads(tmp_path: Path, config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = perturb_zero_init(build_model(config)).eval()
    save_model(model, tmp_path / "model")
    (tmp_path / "model.json").write_text(json.dumps(old_layout(config)))
    loaded = load_model(tmp_path / "model").eval()
    assert loaded.config == model.config
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(loaded.reverse_mean_logvar(z, t)[0], model.reverse_mean_logvar(z, t)[0])


def test_an_old_layout_file_takes_the_old_defaults_for_keys_added_later() -> None:
    """Files from before ``norm_groups``, ``dropout`` and ``attention_resolutions`` (``attention: bool``,
    self-attention at the lowest resolution) were read with the old defaults: 8 groups, no dropout."""
    config = epsilon_config("unet", "learned_range", 10)
    values = old_layout(config)
    for name in ("attention_resolutions", "norm_groups", "dropout", "num_res_blocks"):
        del values["network"][name]
    values["network"]["attention"] = True
    loaded = ModelConfig.from_dict(values)
    loaded_unet = (loaded.attention_resolutions, loaded.norm_groups, loaded.dropout, loaded.num_res_blocks)
    assert loaded_unet == ((4,), 8, 0.0, 2)
    values["network"]["attention"] = False
    assert ModelConfig.from_dict(values).attention_resolutions == ()
    values["network"]["attention_resolutions"] = [4]
    with pytest.raises(ValueError, match="both 'attention'"):
        ModelConfig.from_dict(values)
    with pytest.raises(ValueError, match="unknown keys \\['width'\\]"):
        ModelConfig.from_dict(old_layout(config) | {"width": 3})


def test_article_formulation_needs_mlps() -> None:
    with pytest.raises(ValueError, match=r"model\.network must be 'mlp'"):
        article_config(network="unet")


def test_config_round_trips_through_json() -> None:
    config = epsilon_config("unet", "learned_range", 10)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.image_shape, tuple) and isinstance(again.channel_mults, tuple)


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.update(learning_rate=1e-3), "learning_rate"),
        (lambda d: d["diffusion"].update(beta_max=0.02), "beta_max"),
        (lambda d: d.update(width=64), "width"),
        (lambda d: d.pop("dropout"), "missing keys \\['dropout'\\]"),
    ],
)
def test_config_from_dict_rejects_unknown_keys(mutate, key: str) -> None:
    values = json.loads(json.dumps(epsilon_config().to_dict()))
    mutate(values)
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"schedule": "sigmoid"}, "diffusion.schedule must be one of"),
        ({"schedule": "linear", "num_steps": 0}, "diffusion.num_steps"),
        ({"schedule": "linear", "beta": 0.5}, "diffusion.beta is not used by schedule 'linear'"),
        ({"schedule": "cosine", "beta_start": 0.1}, "diffusion.beta_start is not used by schedule 'cosine'"),
        ({"schedule": "constant"}, "diffusion.beta must be set"),
        ({"schedule": "constant", "beta": 1.5}, "diffusion.beta must lie in the open interval"),
        ({"schedule": "linear", "beta_end": 0.0}, "diffusion.beta_end must lie in the open interval"),
        ({"schedule": "cosine", "offset": -1.0}, "diffusion.offset"),
    ],
)
def test_bad_schedule_params_fail_naming_the_key(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**values)


# --- save / load ----------------------------------------------------------------------------


SAVE_CASES = {
    "article-mlp": article_config(),
    "eps-mlp-fixed": epsilon_config(num_steps=10),
    "eps-mlp-learned": epsilon_config("mlp", "learned_range", 10),
    "eps-unet-learned": epsilon_config("unet", "learned_range", 10),
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path, case: str) -> None:
    torch.manual_seed(0)
    model = perturb_zero_init(build_model(SAVE_CASES[case])).eval()
    weights, config_path = save_model(model, tmp_path / "model")
    assert weights == tmp_path / "model.safetensors" and config_path == tmp_path / "model.json"
    loaded = load_model(tmp_path / "model.safetensors").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 2, 3, 4, 5, 5])
    with torch.no_grad():
        for a, b in zip(model.reverse_mean_logvar(z, t), loaded.reverse_mean_logvar(z, t), strict=True):
            assert torch.equal(a, b)
    assert load_config(tmp_path / "model.json") == model.config


def test_weights_file_is_safetensors_and_loading_never_unpickles(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model(epsilon_config(num_steps=10))
    weights, _ = save_model(model, tmp_path / "model")
    raw = weights.read_bytes()
    # safetensors layout: little-endian u64 header length, then a JSON header
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert raw[8:9] == b"{" and 8 + header_len < len(raw)
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert raw[:2] != b"PK"  # not a torch.save zip archive
    with safe_open(str(weights), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("load_model must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_model(tmp_path / "model")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_weights_that_do_not_match_the_config_raise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(build_model(epsilon_config(num_steps=10)), tmp_path / "model")
    config_file = tmp_path / "model.json"
    original = json.loads(config_file.read_text())

    wider = json.loads(json.dumps(original))
    wider["hidden_dim"] = 64
    config_file.write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=r"do not match.*wrong shape \['network"):
        load_model(tmp_path / "model")

    learned = json.loads(json.dumps(original))
    learned["variance"] = "learned_range"  # doubles the output layer
    config_file.write_text(json.dumps(learned))
    with pytest.raises(ValueError, match=r"wrong shape \['network\.output"):
        load_model(tmp_path / "model")

    article = article_config(image_shape=(1, 8, 8)).to_dict()
    config_file.write_text(json.dumps(article))
    with pytest.raises(ValueError, match=r"missing \['decoder.*unexpected \['network"):
        load_model(tmp_path / "model")

    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path / "model")
    config_file.unlink()
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "model")


def test_missing_weights_file_raises(tmp_path: Path) -> None:
    save_model(build_model(epsilon_config(num_steps=10)), tmp_path / "model")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_model(tmp_path / "model")


def test_failed_save_leaves_old_files_intact_and_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    first = build_model(epsilon_config(num_steps=10))
    save_model(first, tmp_path / "model")
    old_weights = (tmp_path / "model.safetensors").read_bytes()
    old_config = (tmp_path / "model.json").read_text()

    real_save_file = serialization.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # a torn write ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(serialization, "save_file", half_then_fail)
    second = perturb_zero_init(build_model(epsilon_config(num_steps=10, variance="learned_range")))
    with pytest.raises(OSError, match="disk full"):
        save_model(second, tmp_path / "model")
    assert (tmp_path / "model.safetensors").read_bytes() == old_weights
    assert (tmp_path / "model.json").read_text() == old_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "model")  # still the first model, loadable
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_save_creates_parent_directories_and_accepts_any_suffix(tmp_path: Path) -> None:
    model = build_model(article_config())
    for given in ("a/b/model", "a/b/model.json", "a/b/model.safetensors"):
        weights, config_path = save_model(model, tmp_path / given)
        assert weights == tmp_path / "a/b/model.safetensors" and config_path == tmp_path / "a/b/model.json"
    assert isinstance(load_model(tmp_path / "a/b/model.json"), ArticleDDGM)
    reloaded = load_model(tmp_path / "a/b/model")
    assert np.isclose(sum(p.numel() for p in reloaded.parameters()), sum(p.numel() for p in model.parameters()))
