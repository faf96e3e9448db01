"""The real-size presets (presets/mnist-28.yaml, cifar10-32.yaml, 64x64.yaml): overrides of params.yaml
for a folder of images, whose U-Nets have the stated (and, for CIFAR-10, the published) size, and
which train one step on two images of a folder on CPU through the prepare stage's own code."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddgm.config import ModelConfig
from ddgm.data import load_split, prepare_dataset, read_manifest
from ddgm.models import build_model
from ddgm.objectives import compute_objective
from ddgm.quantization import levels_to_unit
from ddgm.schedules import make_betas
from ddgm.timestep_sampler import make_timestep_sampler
from pipeline.params import PipelineParams, load_params

ROOT = Path(__file__).resolve().parents[1]

# name -> (channels, side) of the images the preset is for
PRESETS = {"mnist-28": (1, 28), "cifar10-32": (3, 32), "64x64": (3, 64)}

# Ho et al. 2020 (Appendix B): "Our CIFAR10 model has 35.7 million parameters" (fixed variance, 3 output
# channels). The paper rounds to 0.1M, so the tolerance is half of that: |count - 35.7M| <= 0.05M (0.14%).
HO_CIFAR10_PARAMETERS = 35.7e6
HO_ROUNDING = 0.05e6


def preset_path(name: str) -> Path:
    return ROOT / "presets" / f"{name}.yaml"


def preset_params(name: str) -> PipelineParams:
    """params.yaml with the preset's keys set."""
    return load_params(ROOT / "params.yaml", preset_path(name))


def parameter_count(name: str, variance: str | None = None) -> int:
    """Parameters of the preset's model for its image shape (K = 256), optionally with another variance."""
    params = preset_params(name)
    if variance is not None:
        params.model.variance = variance
    channels, side = PRESETS[name]
    model = build_model(ModelConfig.build(params.model, params.diffusion, (channels, side, side), 256))
    return sum(p.numel() for p in model.parameters())


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    """``count`` random 8-bit RGB PNGs of ``size`` (width, height) in one class subfolder."""
    rng = np.random.default_rng(seed)
    (folder / "cls").mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "cls" / f"{i}.png")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_up_a_folder_of_its_image_size(name: str, tmp_path: Path) -> None:
    params = preset_params(name)
    channels, side = PRESETS[name]
    data = params.data
    assert (data.source, data.image_size, data.channels) == ("folder", side, channels)
    # data.path names a folder the user fills (a DVC dependency of prepare); until it exists, prepare names it
    assert data.path == "images"
    with pytest.raises(FileNotFoundError, match="images"):
        prepare_dataset(replace(data, path=str(tmp_path / "images"), out_dir=str(tmp_path / "shards")))
    assert not (tmp_path / "shards").exists()
    assert (params.model.network, params.model.formulation, params.diffusion.num_steps) == ("unet", "epsilon", 1000)


def test_cifar10_preset_is_ho_et_al_model_with_its_published_parameter_count() -> None:
    params = preset_params("cifar10-32")
    m, d = params.model, params.diffusion
    assert (m.base_channels, m.channel_mults, m.num_res_blocks, m.attention_resolutions, m.dropout) == (
        128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert (d.schedule, d.num_steps, d.beta_start, d.beta_end, m.variance) == (
        "linear", 1000, None, None, "fixed_large")
    betas = make_betas(d.schedule, d.num_steps)  # the defaults at T = 1000: Ho et al.'s 1e-4 .. 0.02
    assert (betas[0], betas[-1]) == (1e-4, 0.02)
    fixed = parameter_count("cifar10-32")
    assert abs(fixed - HO_CIFAR10_PARAMETERS) <= HO_ROUNDING, fixed
    assert fixed == 35_746_307  # the count of Ho et al.'s released implementation of this network
    learned = parameter_count("cifar10-32", "learned_range")  # 6 output channels: one more 3x3 conv slice
    assert learned - fixed == 128 * 3 * 3 * 3 + 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_states_its_parameter_count(name: str) -> None:
    """The count in the preset's header comment is the built model's."""
    stated = re.search(r"([\d,]+) parameters", preset_path(name).read_text())
    assert stated is not None, f"{name}.yaml states no parameter count"
    assert parameter_count(name) == int(stated.group(1).replace(",", ""))


@pytest.mark.parametrize(
    "name", ["mnist-28", "cifar10-32", pytest.param("64x64", marks=pytest.mark.slow)]
)
def test_preset_trains_one_step_on_two_images_of_a_folder(name: str, tmp_path: Path) -> None:
    """Two 40x36 RGB PNGs -> prepare with the preset's data section (resized, centre-cropped, converted to
    its channels) -> the preset's model and objective -> one AdamW step on CPU: a finite loss, finite
    gradients, and the (zero-initialised) output layer moved."""
    params = preset_params(name)
    write_images(tmp_path / "images", 2, (40, 36), seed=0)
    prepare_dataset(replace(params.data, path=str(tmp_path / "images"), out_dir=str(tmp_path / "shards")))
    manifest = read_manifest(tmp_path / "shards")
    channels, side = PRESETS[name]
    assert (tuple(manifest.image_shape), manifest.num_levels) == ((channels, side, side), 256)
    levels, _ = load_split(tmp_path / "shards", "train")
    assert levels.shape == (2, channels, side, side)

    torch.manual_seed(0)
    model = build_model(ModelConfig.build(params.model, params.diffusion, manifest.image_shape,
                                          manifest.num_levels)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    sampler = make_timestep_sampler(params.train.timestep_sampler, model.num_steps)
    x = levels_to_unit(levels, manifest.num_levels)
    output_before = model.network.conv_out.weight.detach().clone()
    loss = compute_objective(params.train.objective, model, x, sampler, torch.Generator().manual_seed(0),
                             params.train.vlb_weight).loss.mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.nn.utils.clip_grad_norm_(model.parameters(), params.train.grad_clip)
    optimizer.step()
    assert not torch.equal(model.network.conv_out.weight, output_before)
