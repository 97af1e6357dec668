"""Segmentation networks: PCT-Net (the paper's), a residual 3D U-Net baseline, and (with the extra
``volumefusion[nnunet]``) the networks nnU-Net plans files describe.

Every network takes (N, C, D, H, W) float input and returns logits, or with deep supervision the
list [full, 1/2, 1/4, 1/8] (nnU-Net's: one per decoder stage, full resolution first), and exposes
``size_divisor`` (z, y, x), ``head_prefixes`` (state-dict prefixes of the class-dependent output
convolutions) and ``encoder_prefixes``. :func:`deep_supervision_owner` finds its deep-supervision switch.
"""

from __future__ import annotations

import torch
from torch import nn

from volumefusion.config import ModelConfig
from volumefusion.nets.pctnet import PCTNet
from volumefusion.nets.unet import UNet3D

__all__ = ["PCTNet", "UNet3D", "build_model", "deep_supervision_owner", "main_output"]


def deep_supervision_owner(model: nn.Module) -> object | None:
    """The object whose ``deep_supervision`` attribute switches ``model``'s coarse outputs: the network
    itself (ours), its ``decoder`` (nnU-Net's), or None for a network without deep supervision."""
    for owner in (model, getattr(model, "decoder", None)):
        if owner is not None and hasattr(owner, "deep_supervision"):
            return owner
    return None


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network named by ``cfg.name`` ("pctnet", "unet" or "nnunet") with ``num_classes`` outputs.

    PCT-Net's ``window_size`` and ``shifted_windows`` hold one value for every pyramid level or one per
    level (1/4, 1/8, 1/16); PCTNet takes either form as it is.
    """
    if cfg.name == "pctnet":
        return PCTNet(
            in_channels=cfg.in_channels, num_classes=num_classes, feature_channels=cfg.feature_channels,
            dropout=cfg.dropout, depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size,
            shifted_windows=cfg.shifted_windows, resolution_mode=cfg.resolution_mode,
            deep_supervision=cfg.deep_supervision, drop_path=cfg.drop_path, rel_pos_index=cfg.rel_pos_index,
            activation_checkpointing=cfg.activation_checkpointing,
        )
    if cfg.name == "unet":
        return UNet3D(
            in_channels=cfg.in_channels, num_classes=num_classes, feature_channels=cfg.feature_channels,
            dropout=cfg.dropout, resolution_mode=cfg.resolution_mode, deep_supervision=cfg.deep_supervision,
        )
    if cfg.name == "nnunet":
        from volumefusion.nets.nnunet import build_plans_network

        return build_plans_network(cfg, num_classes)
    raise ValueError(f"model.name {cfg.name!r}: choose pctnet, unet or nnunet")


def main_output(outputs: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The full-resolution logits of a network: the first element of a deep-supervision list
    ``[full, 1/2, 1/4, ...]``, or the tensor itself. (N, num_classes, D, H, W)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs
