"""Tests for the reverse-process networks: embedding, MLP and U-Net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddgm.nets import MLP, UNet, timestep_embedding
from ddgm.nets.unet import AttentionBlock


def perturb_zero_init(model: nn.Module) -> None:
    """Give every all-zero parameter small random values so zero-initialised layers carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)


# --- timestep_embedding -------------------------------------------------------------------


def test_embedding_shape_dtype_and_odd_padding() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    odd = timestep_embedding(t.float(), 7)
    assert odd.shape == (3, 7)
    assert torch.equal(odd[:, -1], torch.zeros(3))


def test_embedding_at_zero_is_cos_one_sin_zero() -> None:
    emb = timestep_embedding(torch.zeros(2, dtype=torch.long), 10)
    assert torch.equal(emb[:, :5], torch.ones(2, 5))
    assert torch.equal(emb[:, 5:], torch.zeros(2, 5))


def test_embedding_rows_distinct_for_distinct_t() -> None:
    emb = timestep_embedding(torch.arange(1000), 32)
    assert torch.cdist(emb, emb).add(torch.eye(1000) * 1e3).min() > 1e-3
    assert torch.allclose(timestep_embedding(torch.tensor([5]), 8), timestep_embedding(torch.tensor([5.0]), 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(t=torch.zeros(2, 1), dim=8), "t must be a 1-D"),
        (dict(t=torch.zeros(2), dim=1), "dim"),
        (dict(t=torch.zeros(2), dim=8, max_period=0.0), "max_period"),
    ],
)
def test_embedding_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        timestep_embedding(**kwargs)


# --- MLP ------------------------------------------------------------------------------------


def test_mlp_shapes_with_and_without_time() -> None:
    x = torch.randn(5, 3)
    assert MLP(3, 4, hidden_dim=16, depth=2)(x).shape == (5, 4)
    assert MLP(3, 4, hidden_dim=16, depth=1)(x, torch.arange(5)).shape == (5, 4)  # t ignored
    assert MLP(3, 4, hidden_dim=16, depth=3, time_embed_dim=8)(x, torch.arange(5)).shape == (5, 4)


def test_mlp_time_conditioning_changes_output() -> None:
    torch.manual_seed(0)
    net = MLP(2, 2, hidden_dim=16, time_embed_dim=8)
    x = torch.randn(4, 2)
    assert not torch.allclose(net(x, torch.zeros(4)), net(x, torch.full((4,), 50.0)))


def test_mlp_zero_init_output_and_gradients() -> None:
    net = MLP(3, 2, hidden_dim=16, depth=2, time_embed_dim=8, zero_init_output=True)
    x, t = torch.randn(4, 3), torch.arange(4)
    assert torch.equal(net(x, t), torch.zeros(4, 2))
    perturb_zero_init(net)
    net(x, t).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(in_dim=0, out_dim=2), "in_dim"),
        (dict(in_dim=2, out_dim=0), "out_dim"),
        (dict(in_dim=2, out_dim=2, hidden_dim=0), "hidden_dim"),
        (dict(in_dim=2, out_dim=2, depth=0), "depth"),
        (dict(in_dim=2, out_dim=2, time_embed_dim=1), "time_embed_dim"),
    ],
)
def test_mlp_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_mlp_forward_errors() -> None:
    timed = MLP(3, 2, hidden_dim=8, time_embed_dim=8)
    with pytest.raises(ValueError, match="x must have shape"):
        timed(torch.randn(4, 5), torch.arange(4))
    with pytest.raises(ValueError, match="t is required"):
        timed(torch.randn(4, 3))
    with pytest.raises(ValueError, match="t must have shape"):
        timed(torch.randn(4, 3), torch.arange(3))


# --- UNet -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "side"), [(1, 8), (3, 16), (1, 32), (3, 64)])
def test_unet_output_shape(channels: int, side: int) -> None:
    net = UNet(channels, 2 * channels, side, base_channels=8, num_res_blocks=1, norm_groups=4)
    x = torch.randn(2, channels, side, side)
    with torch.no_grad():
        assert net(x, torch.tensor([0, 999])).shape == (2, 2 * channels, side, side)
        assert net(x, torch.tensor([0.5, 0.25])).shape == (2, 2 * channels, side, side)


def attention_sides(net: UNet, side: int) -> list[int]:
    """The feature-map side seen by each self-attention call in one forward pass, in call order."""
    sides: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _inp, out: sides.append(out.shape[-1]))
             for m in net.modules() if isinstance(m, AttentionBlock)]
    with torch.no_grad():
        net(torch.randn(1, net.in_channels, side, side), torch.tensor([1]))
    for hook in hooks:
        hook.remove()
    return sides


def test_unet_attention_at_the_lowest_resolution() -> None:
    net = UNet(1, 1, 16, base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=(4,), norm_groups=4)
    assert attention_sides(net, 16) == [4] * (2 + 1 + 3)  # down, middle, up


@pytest.mark.parametrize(
    ("attention_resolutions", "expected"),
    [
        ((8,), [8, 8, 4, 8, 8, 8]),  # 2 down blocks at 8, the middle block (4), 3 up blocks at 8
        ((16, 8), [16, 16, 8, 8, 4, 8, 8, 8, 16, 16, 16]),
        ((16,), [16, 16, 4, 16, 16, 16]),
    ],
)
def test_unet_attention_at_the_given_resolutions(attention_resolutions: tuple[int, ...], expected: list[int]) -> None:
    """As in Ho et al. 2020: attention after every res block at the listed sides, down and up, plus the middle."""
    net = UNet(1, 1, 16, base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=attention_resolutions,
               norm_groups=4)
    assert attention_sides(net, 16) == expected


def test_unet_on_28x28_with_three_levels() -> None:
    """28 = 4 * 7: levels at 28, 14, 7 round-trip exactly; a fourth level (7 -> 4 -> 8) is refused."""
    net = UNet(1, 1, 28, base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=(14,), norm_groups=4)
    assert attention_sides(net, 28) == [14, 14, 7, 14, 14, 14]
    with torch.no_grad():
        assert net(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(len\\(channel_mults\\)-1\\) = 8"):
        UNet(1, 1, 28, base_channels=8, channel_mults=(1, 2, 2, 2), norm_groups=4)


def test_unet_default_and_wide_configs_on_8x8() -> None:
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for net in (UNet(1, 1, 8), UNet(1, 1, 8, base_channels=64, channel_mults=(1, 2))):
        with torch.no_grad():
            assert net(x, t).shape == (2, 1, 8, 8)


def test_unet_three_levels_without_attention() -> None:
    net = UNet(3, 3, 16, base_channels=8, channel_mults=(1, 2, 2), dropout=0.1, norm_groups=4)
    assert not any(isinstance(m, AttentionBlock) for m in net.modules())
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([3, 4])).shape == (2, 3, 16, 16)


def test_unet_zero_output_at_init() -> None:
    net = UNet(1, 1, 8, base_channels=8, norm_groups=4)
    assert torch.equal(net(torch.randn(3, 1, 8, 8), torch.arange(3)), torch.zeros(3, 1, 8, 8))


def test_unet_output_depends_on_t_and_x() -> None:
    torch.manual_seed(0)
    net = UNet(1, 1, 8, base_channels=8, norm_groups=4)
    perturb_zero_init(net)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([10, 10]))
        assert not torch.allclose(out, net(x, torch.tensor([500, 500])))
        assert not torch.allclose(out, net(x + 0.5 * torch.randn_like(x), torch.tensor([10, 10])))


def test_unet_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = UNet(3, 3, 8, base_channels=8, norm_groups=4)
    perturb_zero_init(net)
    net(torch.randn(2, 3, 8, 8), torch.tensor([1, 700])).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(in_channels=2), "in_channels"),
        (dict(in_channels=True), "in_channels"),
        (dict(out_channels=0), "out_channels"),
        (dict(image_size=4), "image_size"),
        (dict(image_size=128), "image_size"),
        (dict(image_size=12, channel_mults=(1, 2, 2, 2)), "divisible"),
        (dict(image_size=8, channel_mults=(1, 1, 1, 1)), "lowest resolution"),
        (dict(base_channels=0), "base_channels"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(channel_mults=(1, 0)), "channel_mults"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm_groups=0), "norm_groups"),
        (dict(base_channels=12, norm_groups=8), "norm_groups=8 must divide"),
        (dict(attention_resolutions=(16,)), r"attention_resolutions must be sides of .* feature maps \[8, 4\]"),
        (dict(attention_resolutions=(2,)), "attention_resolutions"),
        (dict(attention_resolutions=(4.0,)), "attention_resolutions"),
    ],
)
def test_unet_constructor_errors(kwargs: dict, match: str) -> None:
    args = dict(in_channels=1, out_channels=1, image_size=8, base_channels=8, norm_groups=4) | kwargs
    with pytest.raises(ValueError, match=match):
        UNet(**args)


def test_unet_forward_errors() -> None:
    net = UNet(1, 1, 8, base_channels=8, norm_groups=4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 8, 8\], got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.arange(2))
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 1, 16, 16), torch.arange(2))
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(2, 1, 8, 8), torch.arange(3))


# --- dropout and the time path --------------------------------------------------------------


@pytest.mark.parametrize("bits_on_cpu", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_drops_at_rate_p_and_keeps_the_mean(bits_on_cpu: bool, p: float) -> None:
    from ddgm.nets.unet import Dropout

    dropout = Dropout(p).train()
    dropout.bits_on_cpu = bits_on_cpu
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5  # 4 standard errors
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)), rtol=1e-6)
    assert abs(y.mean().item() - 1.0) < 0.01


def test_dropout_bits_path_follows_the_seed_and_is_identity_in_eval() -> None:
    from ddgm.nets.unet import Dropout

    dropout = Dropout(0.1).train()
    dropout.bits_on_cpu = True
    x = torch.randn(64, 8, 4, 4)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)
    assert dropout(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_unet_time_biases_equal_each_blocks_projection() -> None:
    """The one-matmul time path gives every block time_proj(SiLU(time_mlp(emb(t)))), in forward order."""
    torch.manual_seed(0)
    net = UNet(1, 1, 8, base_channels=16, channel_mults=(1, 2), num_res_blocks=2, attention_resolutions=(4,),
               norm_groups=4)
    t = torch.tensor([1, 7, 50])
    temb = torch.nn.functional.silu(net.time_mlp(timestep_embedding(t, net.base_channels)))
    received: list[tuple[nn.Module, torch.Tensor]] = []
    for block in net.res_blocks:
        block.register_forward_pre_hook(lambda module, args: received.append((module, args[1])))
    net(torch.randn(3, 1, 8, 8), t)
    assert len(received) == len(net.res_blocks) == sum(type(m) is type(net.mid_res1) for m in net.modules())
    for block, bias in received:
        torch.testing.assert_close(bias, block.time_proj(temb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(b.dtype == torch.bfloat16 for b in net.time_biases(t, torch.bfloat16))
