"""Convolutional building blocks shared by the networks (PCT-Net, the U-Net baseline, nnU-Net's PCT-Net).

Every convolution is pre-activation: BatchNorm -> PReLU -> [Dropout] -> Conv. A level that is
``planar`` (the first ``resolution_mode`` levels of anisotropic CT) convolves with 1x3x3 kernels and
is down- or up-sampled in-plane only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def kernel_and_padding(planar: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(kernel, padding) of a 3x3x3 convolution, or of a 1x3x3 one when ``planar``."""
    return ((1, 3, 3), (0, 1, 1)) if planar else ((3, 3, 3), (1, 1, 1))


def scale_factors(planar: bool) -> tuple[int, int, int]:
    """Down/up-sampling factor (z, y, x): in-plane only when ``planar``."""
    return (1, 2, 2) if planar else (2, 2, 2)


class PreActConv(nn.Module):
    """BatchNorm -> PReLU (one slope) -> [Dropout] -> Conv3d (or ConvTranspose3d).

    (N, in_channels, D, H, W) -> (N, out_channels, D', H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dropout: float = 0.0, stride: int | Sequence[int] = 1,
                 transpose: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm3d(in_channels)
        self.act = nn.PReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        conv = nn.ConvTranspose3d if transpose else nn.Conv3d
        self.conv = conv(in_channels, out_channels, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(self.act(self.norm(x))))


class ConvBlock(nn.Module):
    """Two pre-activation convolutions (3x3x3, or 1x3x3 when ``planar``); dropout before the second."""

    def __init__(self, in_channels: int, out_channels: int, planar: bool = False, dropout: float = 0.0):
        super().__init__()
        kernel, padding = kernel_and_padding(planar)
        self.unit1 = PreActConv(in_channels, out_channels, kernel, padding)
        self.unit2 = PreActConv(out_channels, out_channels, kernel, padding, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit2(self.unit1(x))


class DownSample(PreActConv):
    """Max-pooling by 2 (in-plane only when ``pool_planar``), then a pre-activation convolution."""

    def __init__(self, in_channels: int, out_channels: int, pool_planar: bool = False,
                 conv_planar: bool = False):
        kernel, padding = kernel_and_padding(conv_planar)
        super().__init__(in_channels, out_channels, kernel, padding)
        self.scale = scale_factors(pool_planar)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.max_pool3d(x, self.scale))


class UpCat(nn.Module):
    """Up-sample the coarse features by a pre-activation transposed convolution, concatenate them after
    the fine features, and fuse with a pre-activation convolution.

    ``forward(fine (N, c_fine, ...), coarse (N, c_coarse, ...)) -> (N, c_fine, ...)``.
    """

    def __init__(self, c_fine: int, c_coarse: int, up_planar: bool = False, conv_planar: bool = False):
        super().__init__()
        scale = scale_factors(up_planar)
        kernel, padding = kernel_and_padding(conv_planar)
        self.up = PreActConv(c_coarse, c_fine, scale, stride=scale, transpose=True)
        self.fuse = PreActConv(2 * c_fine, c_fine, kernel, padding)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([fine, self.up(coarse)], dim=1))
