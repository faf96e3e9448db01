"""DDPM-style U-Net (Ho et al. 2020) for small square images, conditioned on the timestep."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ddgm.nets.embedding import check_int, timestep_embedding


@functools.cache
def cpu_bernoulli_is_vectorised() -> bool:
    """Whether torch's CPU ``bernoulli_(p)`` runs MKL's vectorised generator, which it does only in
    an MKL build on an Intel CPU (elsewhere it draws and compares a double per element, serially)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    return "GenuineIntel" in info or "Intel64" in info


class Dropout(nn.Module):
    """Inverted dropout, ``x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per element, as ``nn.Dropout``.

    Where torch's CPU ``bernoulli_`` is the serial per-element loop (see
    ``cpu_bernoulli_is_vectorised``), the mask comes from 31 random bits per element instead
    (``random_`` on int32 draws uniformly from [0, 2^31) with the default generator): m = [bits >= k],
    k = round(p 2^31), so an element is dropped with probability k / 2^31 (within 2^-32 of p), and
    the kept ones are scaled by 2^31 / (2^31 - k) = 1 / P(m = 1), rounded to x's dtype as in
    ``nn.Dropout``. That halves the cost of the mask. Elsewhere (CUDA, Intel CPUs) it is ``F.dropout``.
    """

    BITS = 2**31

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = min(round(p * self.BITS), self.BITS - 1)
        self.bits_on_cpu = not cpu_bernoulli_is_vectorised()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not self.bits_on_cpu:
            return F.dropout(x, self.p, training=True)
        keep = torch.empty(x.shape, dtype=torch.int32).random_() >= self.threshold
        return x * keep.to(x.dtype).mul_(self.BITS / (self.BITS - self.threshold))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def zero_init(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: ``skip(x) + conv2(drop(SiLU(GN(conv1(SiLU(GN(x))) + time_proj(temb)))))``.

    The time embedding enters as a per-channel bias after ``conv1`` (``time_proj(temb)``, which
    the U-Net computes for all its blocks at once); ``conv2`` starts at zero, so the block is the
    (1x1 conv) skip path at initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C_in, H, W], ``time_bias`` = ``time_proj(temb)`` [B, C_out] -> [B, C_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + time_bias[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions: ``x + proj(attn(GN(x)))``, proj zero-initialised."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C], softmax(q k^T / sqrt(C)) v
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def unet_resolutions(image_size: int, num_levels: int) -> list[int]:
    """The side of the feature maps at each level: ``image_size / 2**i`` for i < ``num_levels``."""
    return [image_size // 2**level for level in range(num_levels)]


def check_unet_args(
    in_channels: int,
    out_channels: int,
    image_size: int,
    base_channels: int,
    channel_mults: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    dropout: float,
    norm_groups: int,
) -> None:
    """ValueError naming the first argument of ``UNet`` that is out of range or inconsistent."""
    if type(in_channels) is not int or in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    check_int("out_channels", out_channels, 1)
    check_int("image_size", image_size, 8)
    if image_size > 64:
        raise ValueError(f"image_size must be in [8, 64], got {image_size!r}")
    check_int("base_channels", base_channels, 1)
    if not channel_mults:
        raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {channel_mults!r}")
    for mult in channel_mults:
        check_int("each of channel_mults", mult, 1)
    check_int("num_res_blocks", num_res_blocks, 1)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    check_int("norm_groups", norm_groups, 1)
    factor = 2 ** (len(channel_mults) - 1)
    if image_size % factor or image_size // factor < 2:
        raise ValueError(
            f"image_size must be divisible by 2**(len(channel_mults)-1) = {factor} with lowest "
            f"resolution >= 2, got image_size={image_size} and channel_mults={channel_mults}"
        )
    resolutions = unet_resolutions(image_size, len(channel_mults))
    for side in attention_resolutions:
        if type(side) is not int or side not in resolutions:
            raise ValueError(
                f"attention_resolutions must be sides of this U-Net's feature maps {resolutions} "
                f"(image_size={image_size}, channel_mults={channel_mults}), got {side!r}"
            )
    channels = [base_channels * mult for mult in channel_mults]
    bad = [c for c in channels if c % norm_groups]
    if bad:
        raise ValueError(
            f"norm_groups={norm_groups} must divide every channel count "
            f"base_channels * channel_mults = {channels}; it does not divide {bad}"
        )


class UNet(nn.Module):
    """Timestep-conditioned U-Net ``[B, in_channels, S, S] -> [B, out_channels, S, S]`` (Ho et al. 2020).

    Level i (of ``len(channel_mults)``) works at resolution ``S / 2**i`` with
    ``base_channels * channel_mults[i]`` channels. The encoder has ``num_res_blocks`` residual
    blocks per level and a stride-2 conv between levels; the decoder has ``num_res_blocks + 1``
    blocks per level, each fed the concatenation with one stored encoder activation, and
    nearest + conv upsampling between levels. The middle block is res -> attention -> res.
    Single-head self-attention follows every residual block whose resolution (side in pixels)
    is in ``attention_resolutions``, in the encoder and the decoder, and sits in the middle
    block whenever ``attention_resolutions`` is non-empty; with ``()`` there is none.
    The timestep goes through a sinusoidal embedding (``base_channels`` features) and
    Linear -> SiLU -> Linear to ``4 * base_channels`` features, added inside every residual
    block. Output: GroupNorm -> SiLU -> zero-initialised 3x3 conv, so the network outputs 0
    at initialisation. ``norm_groups`` must divide every level's channel count (it is checked,
    not adjusted). Ho et al.'s CIFAR-10 network is ``base_channels=128, channel_mults=(1, 2, 2, 2),
    num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, norm_groups=32``: 35,746,307
    parameters with ``out_channels=3``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        channel_mults, attention_resolutions = tuple(channel_mults), tuple(attention_resolutions)
        check_unet_args(in_channels, out_channels, image_size, base_channels, channel_mults, num_res_blocks,
                        attention_resolutions, dropout, norm_groups)
        self.in_channels = in_channels
        self.image_size = image_size
        self.base_channels = base_channels
        self.attention_resolutions = attention_resolutions
        self.dropout, self.norm_groups = dropout, norm_groups
        self.time_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, self.time_dim),
            nn.SiLU(),
            nn.Linear(self.time_dim, self.time_dim),
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        channels = [base_channels * mult for mult in channel_mults]
        resolutions = unet_resolutions(image_size, len(channels))
        skip_channels = self._build_down(channels, resolutions, num_res_blocks)
        ch = skip_channels[-1]
        self.mid_res1 = self._res(ch, ch)
        self.mid_attn = AttentionBlock(ch, norm_groups) if attention_resolutions else nn.Identity()
        self.mid_res2 = self._res(ch, ch)
        self._build_up(channels, resolutions, num_res_blocks, skip_channels)
        self.norm_out = nn.GroupNorm(norm_groups, base_channels * channel_mults[0])
        self.conv_out = zero_init(nn.Conv2d(base_channels * channel_mults[0], out_channels, 3, padding=1))
        # the residual blocks in the order forward runs them (a plain list: they are registered above)
        down = [block for block in self.down if not isinstance(block, Downsample)]
        up = [block for block in self.up if not isinstance(block, Upsample)]
        self.res_blocks: list[ResBlock] = [cast(ResBlock, cast(nn.ModuleList, block)[0]) for block in down]
        self.res_blocks += [self.mid_res1, self.mid_res2]
        self.res_blocks += [cast(ResBlock, cast(nn.ModuleList, block)[0]) for block in up]

    def _res(self, c_in: int, c_out: int) -> ResBlock:
        return ResBlock(c_in, c_out, self.time_dim, self.dropout, self.norm_groups)

    def _attention(self, channels: int, side: int) -> nn.Module:
        return AttentionBlock(channels, self.norm_groups) if side in self.attention_resolutions else nn.Identity()

    def _build_down(self, channels: list[int], resolutions: list[int], num_res_blocks: int) -> list[int]:
        """The encoder into ``self.down``; returns the channel count of every stored activation."""
        self.down = nn.ModuleList()
        skip_channels = [self.base_channels]
        ch = self.base_channels
        for level, (c, side) in enumerate(zip(channels, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([self._res(ch, c), self._attention(c, side)]))
                ch = c
                skip_channels.append(ch)
            if level != len(channels) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
        return skip_channels

    def _build_up(self, channels: list[int], resolutions: list[int], num_res_blocks: int,
                  skip_channels: list[int]) -> None:
        """The decoder into ``self.up``, consuming ``skip_channels`` from the end."""
        skip_channels = list(skip_channels)
        self.up = nn.ModuleList()
        ch = skip_channels[-1]
        for level in reversed(range(len(channels))):
            c, side = channels[level], resolutions[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([self._res(ch + skip_channels.pop(), c), self._attention(c, side)]))
                ch = c
            if level != 0:
                self.up.append(Upsample(ch))

    def time_biases(self, t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every residual block's time bias ``time_proj(SiLU(time_mlp(emb(t))))`` [B, C_out], in the
        order of ``res_blocks``, cast to ``dtype``. The time MLP and the projections (one matmul over
        the blocks' concatenated weights) run outside autocast, in the parameters' precision: at
        these sizes a bfloat16 matmul on CPU costs more than a float32 one."""
        with torch.autocast(t.device.type, enabled=False):
            temb = F.silu(self.time_mlp(timestep_embedding(t, self.base_channels).to(self.conv_in.weight.dtype)))
            weight = torch.cat([block.time_proj.weight for block in self.res_blocks])
            bias = torch.cat([block.time_proj.bias for block in self.res_blocks])
            biases = F.linear(temb, weight, bias).to(dtype)
        return list(biases.split([block.time_proj.out_features for block in self.res_blocks], dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict [B, out_channels, S, S] from images ``x`` [B, in_channels, S, S] at timesteps ``t`` [B]."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must have shape [{x.shape[0]}], got {got}")
        h = self.conv_in(x)
        time_bias = iter(self.time_biases(t, h.dtype))
        skips = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
            else:
                resblock, attn = cast(nn.ModuleList, block)  # [ResBlock, attention or Identity]
                h = attn(resblock(h, next(time_bias)))
            skips.append(h)

        h = self.mid_attn(self.mid_res1(h, next(time_bias)))
        h = self.mid_res2(h, next(time_bias))

        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                resblock, attn = cast(nn.ModuleList, block)  # [ResBlock, attention or Identity]
                h = attn(resblock(torch.cat([h, skips.pop()], dim=1), next(time_bias)))

        return self.conv_out(F.silu(self.norm_out(h)))
