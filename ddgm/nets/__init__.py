"""Reverse-process networks: a time-conditioned MLP, a DDPM-style U-Net and the sinusoidal timestep embedding."""

from ddgm.nets.embedding import timestep_embedding
from ddgm.nets.mlp import MLP
from ddgm.nets.unet import UNet

__all__ = ["MLP", "UNet", "timestep_embedding"]
