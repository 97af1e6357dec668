"""CT intensity normalisation shared by pretraining, fine-tuning and prediction."""

from __future__ import annotations

import torch


def normalise_hu(x: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> torch.Tensor:
    """Clip HU to ``window`` and map it linearly to [-1, 1].

    ``x``: any shape, int16 or float HU, any device. Returns float32 of the same shape.
    """
    low, high = window
    x = x.float().clamp_(low, high) if x.dtype != torch.float32 else x.clamp(low, high)
    return x.sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
