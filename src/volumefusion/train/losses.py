"""Dice + cross-entropy with deep supervision (MIS-FM pretraining and fine-tuning loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_targets(labels: torch.Tensor, num_classes: int, size: tuple[int, ...]) -> torch.Tensor:
    """One-hot class map average-pooled to ``size``.

    ``labels``: (N, D, H, W) integer. Returns (N, num_classes, *size) float32 whose channels sum to 1:
    at full size it is the one-hot map; at a coarser output it holds each class's share of the voxels
    a coarse voxel covers (the reference down-samples targets the same way).
    """
    onehot = F.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    if tuple(onehot.shape[2:]) == tuple(size):
        return onehot
    return F.adaptive_avg_pool3d(onehot, size)


def dice_ce(logits: torch.Tensor, target: torch.Tensor, dice_weight: float, ce_weight: float) -> torch.Tensor:
    """Soft Dice (mean over classes, pooled over the batch) plus soft-target cross-entropy.

    ``logits``: (N, C, D, H, W); ``target``: (N, C, D, H, W) probabilities. Computed in float32.
    """
    logits = logits.float()
    log_p = F.log_softmax(logits, dim=1)
    loss = logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * -(target * log_p).sum(1).mean()
    if dice_weight:
        p = log_p.exp()
        dims = (0, 2, 3, 4)
        intersection = (p * target).sum(dims)
        denominator = p.sum(dims) + target.sum(dims)
        dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
        loss = loss + dice_weight * (1 - dice.mean())
    return loss


class DeepSupervisionLoss(nn.Module):
    """Dice + CE on each network output, weighted 1/2^i and normalised to sum to 1.

    Call with ``outputs`` (a tensor, or the list [full, 1/2, 1/4, 1/8] of logits) and ``labels``
    (N, D, H, W) integer at full resolution. With ``deep_supervision=False`` only the first output counts.
    """

    def __init__(self, num_classes: int, dice_weight: float = 0.5, ce_weight: float = 0.5,
                 deep_supervision: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.deep_supervision = deep_supervision

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if not self.deep_supervision:
            outputs = outputs[:1]
        weights = [0.5**i for i in range(len(outputs))]
        total = sum(weights)
        loss = outputs[0].new_zeros((), dtype=torch.float32)
        for w, logits in zip(weights, outputs):
            target = soft_targets(labels, self.num_classes, tuple(logits.shape[2:]))
            loss = loss + (w / total) * dice_ce(logits, target, self.dice_weight, self.ce_weight)
        return loss


def dice_per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice of each class over a whole batch: (num_classes,) float; NaN where a class is absent
    from both prediction and reference. ``pred`` and ``labels``: (N, D, H, W) integer."""
    pred = F.one_hot(pred.long(), num_classes).flatten(0, -2).float()
    ref = F.one_hot(labels.long(), num_classes).flatten(0, -2).float()
    intersection = (pred * ref).sum(0)
    denominator = pred.sum(0) + ref.sum(0)
    dice = 2 * intersection / denominator
    return torch.where(denominator > 0, dice, torch.full_like(dice, float("nan")))
