"""The speed settings of the training step (train.mixed_precision, compile, channels_last,
allow_tf32, fused_optimizer, pin_memory; ddgm.training.acceleration).

Every path that can run on a CPU runs here: bf16 autocast, channels_last, torch.compile. Whatever
the training precision, validation (the ELBO in bits/dim) runs in float32, without autocast, on
the uncompiled, contiguous EMA model; checkpoints and saved models hold plain parameter names.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_training import (
    Recorder,
    _objective_with_global_rng,
    assert_same_run,
    run,
    step_dirs,
    tiny,
)

from ddgm.config import ModelConfig
from ddgm.models import build_model
from ddgm.serialization import load_model
from ddgm.training import step as step_module
from ddgm.training import validator
from ddgm.training.acceleration import (
    batch_to_device,
    compile_networks,
    configure_backends,
    make_optimizer,
)
from ddgm.training.config import TrainConfig
from ddgm.training.signals import Preempted, StopSignal
from ddgm.training.validation import split_elbo
from pipeline.params import params_from_dict

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process (AcceleratorState refuses another):
    forget it before and after a test that trains in another precision (what Accelerate's own tests do)."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def tiny_unet(shards, **train_values) -> dict:
    """A tiny U-Net (8 channels, one level, no attention, no dropout) on the digits."""
    values = tiny(shards, **train_values)
    values["model"] = {"formulation": "epsilon", "network": "unet", "base_channels": 8, "channel_mults": [1],
                       "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0, "variance": "learned_range"}
    return values


def _spy(monkeypatch, seen: dict) -> None:
    """Record what the training objective and the validation see, then run the real ones."""
    real_objective, real_split_elbo = step_module.compute_objective, validator.split_elbo

    def objective(name, model, x, *args, **kwargs):
        seen.setdefault("train", []).append({
            "autocast": torch.is_autocast_enabled("cpu"), "autocast_dtype": torch.get_autocast_dtype("cpu"),
            "x_channels_last": x.is_contiguous(memory_format=torch.channels_last),
            "weights_channels_last": _channels_last_only(model),
            "compiled": _compiled(model)})
        return real_objective(name, model, x, *args, **kwargs)

    def validation(model, *args, **kwargs):
        seen.setdefault("val", []).append({
            "autocast": torch.is_autocast_enabled("cpu"), "compiled": _compiled(model),
            "dtypes": {p.dtype for p in model.parameters()},
            "contiguous": all(p.is_contiguous() for p in model.parameters())})
        return real_split_elbo(model, *args, **kwargs)

    monkeypatch.setattr(step_module, "compute_objective", objective)
    monkeypatch.setattr(validator, "split_elbo", validation)


def _channels_last_only(model: torch.nn.Module) -> bool:
    """Whether the model has convolution weights (of more than one input channel) and all are NHWC only."""
    weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in weights)


def _compiled(model: torch.nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _assert_plain_names(workdir) -> None:
    """Checkpoints and the saved model hold the model's own parameter names, and the model loads."""
    model = load_model(workdir / "models/model")
    names = set(model.state_dict())
    assert set(load_file(workdir / "models/model.safetensors")) == names
    last = max((workdir / "checkpoints").glob("step-*"))
    assert {k.removeprefix("ema_model.") for k in load_file(last / "ema.safetensors")} >= names
    assert not [k for k in load_file(last / "ema.safetensors") if "_orig_mod" in k]
    online = {k.removeprefix("model.") for k in load_file(last / "model.safetensors")}
    assert online == names, online ^ names


def test_bf16_autocast_trains_but_validation_is_float32_on_the_plain_ema_model(
        tmp_path, monkeypatch, digits_shards, fresh_accelerator_state):
    monkeypatch.chdir(tmp_path)
    seen, recorder = {}, Recorder()
    _spy(monkeypatch, seen)
    values = tiny_unet(digits_shards, max_steps=10, val_every=5, mixed_precision="bf16")
    result = run(values, recorder)
    assert all(s["autocast"] and s["autocast_dtype"] == torch.bfloat16 for s in seen["train"])
    assert len(seen["val"]) == 2
    assert all(not s["autocast"] and s["dtypes"] == {torch.float32} and s["contiguous"] for s in seen["val"])
    # the logged val bits/dim is the float32 ELBO of the saved weights, recomputed outside training
    t = values["train"]
    again = split_elbo(load_model(tmp_path / "models/model"), str(digits_shards), "val", t["val_batch_size"],
                       t["val_chunk"], 0, decoder="discretized", max_images=t["val_max_images"])
    assert again.bits_per_dim()["total"] == recorder.value("val/total_bpd", result.best_step)
    _assert_plain_names(tmp_path)


def test_channels_last_trains_on_nhwc_batches_and_saves_plain_contiguous_weights(tmp_path, monkeypatch,
                                                                                 digits_shards):
    monkeypatch.chdir(tmp_path)
    seen = {}
    _spy(monkeypatch, seen)
    run(tiny_unet(digits_shards, max_steps=6, val_every=6, checkpoint_every=3, channels_last=True))
    assert all(s["x_channels_last"] and s["weights_channels_last"] and not s["autocast"] for s in seen["train"])
    assert all(s["contiguous"] and s["dtypes"] == {torch.float32} for s in seen["val"])
    assert step_dirs(tmp_path / "checkpoints") == ["step-00000003", "step-00000006"]
    _assert_plain_names(tmp_path)


@pytest.mark.slow
def test_compiled_training_resumes_bit_exactly_and_saves_plain_names(tmp_path, monkeypatch, digits_shards, capsys):
    """train.compile: the networks run compiled (validation does not), a run preempted at step 7
    and resumed equals one never stopped, and checkpoints hold no ``_orig_mod.`` names."""
    values = tiny(digits_shards, max_steps=10, val_every=10, compile=True)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    seen = {}
    _spy(monkeypatch, seen)
    spy = step_module.compute_objective

    def objective_with_global_rng(**kwargs) -> None:  # the spy, plus a draw from the global RNG
        monkeypatch.setattr(step_module, "compute_objective", spy)
        monkeypatch.setattr(step_module, "compute_objective", _objective_with_global_rng(**kwargs))

    monkeypatch.chdir(tmp_path / "a")
    objective_with_global_rng()
    run(values)
    assert all(s["compiled"] for s in seen["train"]) and not any(s["compiled"] for s in seen["val"])
    _assert_plain_names(tmp_path / "a")

    monkeypatch.chdir(tmp_path / "b")
    stop = StopSignal()
    objective_with_global_rng(stop=stop, stop_at=7)
    with pytest.raises(Preempted, match="step 7"):
        run(values, stop=stop)
    objective_with_global_rng()
    capsys.readouterr()
    run(values)
    assert "at step 7" in capsys.readouterr().out
    assert_same_run(tmp_path / "a", tmp_path / "b")


# --------------------------------------------------------------------------- the pieces, on CPU


def test_fused_adamw_when_asked_for_else_foreach():
    model = torch.nn.Linear(3, 2)
    fused = make_optimizer(TrainConfig(), model)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"]
    foreach = make_optimizer(TrainConfig(fused_optimizer=False), model)
    assert not foreach.defaults["fused"] and foreach.defaults["foreach"]
    adamax = make_optimizer(TrainConfig(optimizer="adamax"), model)
    assert isinstance(adamax, torch.optim.Adamax) and adamax.defaults["foreach"]
    for optimizer in (fused, foreach, adamax):  # each kernel steps on CPU
        model(torch.ones(1, 3)).sum().backward()
        before = model.weight.detach().clone()
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(before, model.weight)


def test_tf32_is_set_on_cuda_only():
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [flag.allow_tf32 for flag in flags]
    try:
        for flag in flags:
            flag.allow_tf32 = False
        configure_backends(TrainConfig(allow_tf32=True), torch.device("cpu"))
        assert not any(flag.allow_tf32 for flag in flags)
        configure_backends(TrainConfig(allow_tf32=True), torch.device("cuda"))
        assert all(flag.allow_tf32 for flag in flags)
        configure_backends(TrainConfig(allow_tf32=False), torch.device("cuda"))
        assert not any(flag.allow_tf32 for flag in flags)
    finally:
        for flag, value in zip(flags, saved, strict=True):
            flag.allow_tf32 = value


def test_batches_on_cpu_are_not_pinned_and_take_the_training_layout():
    x = torch.rand(4, 3, 8, 8)
    plain = batch_to_device(x, torch.device("cpu"), TrainConfig(pin_memory=True))
    assert torch.equal(plain, x) and plain.is_contiguous() and not plain.is_pinned()
    nhwc = batch_to_device(x, torch.device("cpu"), TrainConfig(channels_last=True))
    assert torch.equal(nhwc, x) and nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()


def test_compile_networks_compiles_in_place_and_keeps_the_state_dict_names(digits_shards):
    params = params_from_dict(tiny_unet(digits_shards))
    model = build_model(ModelConfig.build(params.model, params.diffusion, (1, 8, 8), 17))
    names = list(model.state_dict())
    assert compile_networks(model, "default") == 1
    assert list(model.state_dict()) == names and _compiled(model.network)
    assert json.dumps(names).count("_orig_mod") == 0
