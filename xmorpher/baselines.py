"""The paper's comparison models, with XMorpher's interface ``model(moving, fixed) -> flow``.

* :func:`XMorpherNoCross`: the paper's "no-cross XMorpher" ablation, the registered variant
  ``build_model("xmorpher-nocross")``: XMorpher with ``fusion="concat"``, one stream whose input
  is the moving and fixed volumes concatenated along channels, every block attending within it.
* :class:`VoxelMorph`: the VoxelMorph U-net (Balakrishnan et al. 2019, "VoxelMorph-1" widths):
  3x3x3 convolutions with LeakyReLU(0.2), encoder 16-32-32-32 with max pooling, decoder
  32-32-32-32 with nearest upsampling and skip concatenation, then 32-16-16 at full resolution
  and a 3x3x3 flow convolution initialised near zero. Odd sizes: pooling rounds up (ceil mode)
  and each upsampled map is cropped to its skip connection, so nothing is resampled.

Both accept ``diffeomorphic=True`` (scaling and squaring of the output as a velocity field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .framework import integrate_velocity
from .model import XMorpher, XMorpherConfig, check_pair, resolve_config

__all__ = ["XMorpherNoCross", "VoxelMorph", "VoxelMorphConfig"]


def XMorpherNoCross(config: Optional[XMorpherConfig] = None, **kwargs: object) -> XMorpher:  # noqa: N802
    """The no-cross ablation, ``build_model("xmorpher-nocross", config, **kwargs)``: an XMorpher
    with ``fusion="concat"``; ``kwargs`` are XMorpher's (``attention_backend``, config fields).
    A constructor named like the class it replaces, so that callers and checkpoints keep working."""
    from .factory import build_model  # the registry imports this module

    return build_model("xmorpher-nocross", config, **kwargs)


@dataclass(frozen=True)
class VoxelMorphConfig:
    """Hyper-parameters of the VoxelMorph U-net; defaults are VoxelMorph-1's.

    Attributes:
        in_chans: channels of each input volume (the network sees the pair concatenated).
        encoder_channels: one convolution per level, each followed by 2x max pooling.
        decoder_channels: the first ``len(encoder_channels)`` are one convolution per level, each
            followed by 2x upsampling and skip concatenation; the rest run at full resolution.
        diffeomorphic: integrate the output as a stationary velocity field.
        integration_steps: squaring steps of the diffeomorphic mode.
    """

    in_chans: int = 1
    encoder_channels: Tuple[int, ...] = (16, 32, 32, 32)
    decoder_channels: Tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
    diffeomorphic: bool = False
    integration_steps: int = 7

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_channels", tuple(self.encoder_channels))
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if len(self.decoder_channels) < len(self.encoder_channels):
            raise ValueError("decoder_channels needs at least one entry per encoder level")


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.LeakyReLU(0.2))


class VoxelMorph(nn.Module):
    """VoxelMorph U-net: ``model(moving, fixed)`` -> displacement ``(B, 3, D, H, W)`` in voxels.

    Args:
        config: a :class:`VoxelMorphConfig`; default VoxelMorph-1.
        **overrides: fields of ``config`` to replace.
    """

    def __init__(self, config: Optional[VoxelMorphConfig] = None, **overrides: object) -> None:
        super().__init__()
        self.config: VoxelMorphConfig = resolve_config(VoxelMorphConfig, config, overrides)
        c = self.config
        levels = len(c.encoder_channels)
        self.encoder = nn.ModuleList()
        skip_channels = []
        channels = 2 * c.in_chans
        for out in c.encoder_channels:
            self.encoder.append(_conv_block(channels, out))
            skip_channels.append(out)
            channels = out
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.ModuleList()
        for level, out in enumerate(c.decoder_channels[:levels]):
            self.decoder.append(_conv_block(channels, out))
            channels = out + skip_channels[levels - 1 - level]
        self.remaining = nn.Sequential(*(_conv_block(i, o) for i, o in zip((channels,) + c.decoder_channels[levels:], c.decoder_channels[levels:])))
        channels = c.decoder_channels[-1] if len(c.decoder_channels) > levels else channels
        self.flow = nn.Conv3d(channels, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_pair(moving, fixed, self.config.in_chans)
        x = torch.cat([moving, fixed], dim=1)
        skips = []
        for conv in self.encoder:
            x = conv(x)
            skips.append(x)
            x = self.pool(x)
        for conv in self.decoder:
            skip = skips.pop()
            x = self.upsample(conv(x))[:, :, : skip.shape[2], : skip.shape[3], : skip.shape[4]]
            x = torch.cat([x, skip], dim=1)
        flow = self.flow(self.remaining(x))
        if self.config.diffeomorphic:
            flow = integrate_velocity(flow, self.config.integration_steps)
        return flow
