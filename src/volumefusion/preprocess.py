"""CT intensities: normalisation shared by pretraining, fine-tuning and prediction, and plausibility checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def normalise_hu(x: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> torch.Tensor:
    """Clip HU to ``window`` and map it linearly to [-1, 1].

    ``x``: any shape, int16 or float HU, any device. Returns float32 of the same shape.
    """
    import torch  # here, not at the top: prepare's worker processes use this module without torch

    low, high = window
    x = x.float().clamp_(low, high) if x.dtype != torch.float32 else x.clamp(low, high)
    return x.sub_(low).mul_(2.0 / (high - low)).sub_(1.0)


PLAUSIBLE_SPACING_MM = (0.2, 10.0)
"""Voxel sides outside this range (mm) are unusual for CT: a header in other units or a damaged one."""
AIR_HU = -500.0
"""A CT whose lowest value is above this has no air anywhere: likely not in Hounsfield units."""


def suspicious_values(image: np.ndarray, spacing_zyx: tuple[float, float, float]) -> list[str]:
    """Why ``image`` ((z, y, x), any numeric dtype, meant to be HU) with ``spacing_zyx`` (mm) may not be
    the CT it should be, one phrase per finding (empty if none), for warnings that name the file:
    values beyond int16 (clipped when stored), no air, a constant image, a spacing outside
    :data:`PLAUSIBLE_SPACING_MM`."""
    found = []
    low, high = float(image.min()), float(image.max())
    if low < -32768 or high > 32767:
        found.append(f"values {low:g}..{high:g} HU exceed int16 and are clipped to -32768..32767")
    if low == high:
        found.append(f"every voxel is {low:g}: an empty or blank image")
    elif low > AIR_HU:
        found.append(f"lowest value {low:g}: no air (about -1000 HU) anywhere; is this CT in Hounsfield units?")
    small, large = PLAUSIBLE_SPACING_MM
    if min(spacing_zyx) < small or max(spacing_zyx) > large:
        spacing = " x ".join(f"{s:g}" for s in spacing_zyx)
        found.append(f"voxel spacing {spacing} mm (z y x) is outside the usual {small:g}..{large:g} mm of CT; "
                     "check the header's units")
    return found
