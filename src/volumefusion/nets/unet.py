"""A residual 3D U-Net baseline with the same interface as :class:`~volumefusion.nets.PCTNet`.

Five levels (``feature_channels``), four down-samplings by max-pooling (the first
``resolution_mode`` of them in-plane only, with 1x3x3 convolutions at those levels), transposed
convolutions up, concatenated skips, and pre-activation residual blocks everywhere. Outputs at full,
1/2, 1/4 and 1/8 resolution for deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from volumefusion.nets.blocks import ConvBlock, PreActConv, UpCat, kernel_and_padding, scale_factors


class ResBlock(ConvBlock):
    """A :class:`ConvBlock` plus a shortcut (1x1x1 convolution when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, planar: bool = False, dropout: float = 0.0):
        super().__init__(in_channels, out_channels, planar, dropout)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + super().forward(x)


class UNet3D(nn.Module):
    """Residual 3D U-Net: (N, in_channels, D, H, W) -> logits (N, num_classes, D, H, W), or with
    ``deep_supervision`` (settable at any time) the list ``[full, 1/2, 1/4, 1/8]``.
    D, H, W must be multiples of :attr:`size_divisor`.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5,
                 feature_channels: Sequence[int] = (24, 48, 128, 256, 512),
                 dropout: Sequence[float] = (0.0, 0.0, 0.2, 0.2, 0.2), resolution_mode: int = 1,
                 deep_supervision: bool = True):
        super().__init__()
        levels = len(feature_channels)
        if levels < 5 or len(dropout) != levels:
            raise ValueError(f"feature_channels {list(feature_channels)} (at least 5 levels) and dropout "
                             f"{list(dropout)} need the same length")
        if not 0 <= resolution_mode < levels:
            raise ValueError(f"resolution_mode {resolution_mode}: must be in [0, {levels - 1}]")
        f = list(feature_channels)
        planar = [i < resolution_mode for i in range(levels)]  # level i's convs; pooling i -> i+1
        self.scales = [scale_factors(planar[i]) for i in range(levels - 1)]
        self.deep_supervision = deep_supervision
        kernel, padding = kernel_and_padding(planar[0])
        self.proj = nn.Conv3d(in_channels, f[0], kernel, padding=padding)
        self.encoders = nn.ModuleList(
            ResBlock(f[max(i - 1, 0)], f[i], planar[i], dropout[i]) for i in range(levels)
        )
        self.ups = nn.ModuleList(UpCat(f[i], f[i + 1], planar[i], planar[i]) for i in range(levels - 1))
        self.decoders = nn.ModuleList(ResBlock(f[i], f[i], planar[i], dropout[i]) for i in range(levels - 1))
        self.outputs = nn.ModuleList(PreActConv(f[i], num_classes) for i in range(4))

        divisor = [1, 1, 1]
        for s in self.scales:
            divisor = [d * k for d, k in zip(divisor, s)]
        self.size_divisor: tuple[int, int, int] = tuple(divisor)
        self.head_prefixes: tuple[str, ...] = tuple(f"outputs.{i}.conv." for i in range(4))
        self.encoder_prefixes: tuple[str, ...] = ("proj.", "encoders.")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        bad = [n for n, d in zip(x.shape[2:], self.size_divisor) if n % d]
        if x.dim() != 5 or bad:
            raise ValueError(f"UNet3D input {tuple(x.shape)}: expected (N, C, D, H, W) with D, H, W "
                             f"multiples of {self.size_divisor}")
        skips = []
        x = self.proj(x)
        for i, encoder in enumerate(self.encoders):
            if i:
                x = F.max_pool3d(x, self.scales[i - 1])
            x = encoder(x)
            skips.append(x)
        decoded = []
        for i in reversed(range(len(self.decoders))):
            x = self.decoders[i](self.ups[i](skips[i], x))
            decoded.append(x)
        decoded.reverse()  # decoded[i] is at level i
        out = self.outputs[0](decoded[0])
        if not self.deep_supervision:
            return out
        return [out] + [self.outputs[i](decoded[i]) for i in range(1, 4)]
