"""PCT-Net's shape rules: what its feature channels, depths, heads and windows must satisfy.

One function, read both where settings are checked (:func:`volumefusion.config.validate`, so a config
that breaks a rule fails when it is read, naming the field) and where the network is built
(:class:`volumefusion.nets.pctnet.PCTNet`), so the two cannot disagree. It sits on the lowest layer,
beside :mod:`volumefusion.nnunet_plans` (nnU-Net's rules), because settings are read without torch
and cannot import the networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from volumefusion.typed_config import ConfigError

LEVELS = 5
"""Feature levels: full resolution, 1/2 (the convolution stem), 1/4, 1/8, 1/16 (the pyramid)."""
PYRAMID = 3
"""Transformer levels: 1/4, 1/8, 1/16."""


class PyramidShape(NamedTuple):
    """One value per transformer level (1/4, 1/8, 1/16)."""

    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, ...]
    shifted_windows: tuple[bool, ...]


def _values(value) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,)


def pyramid_shape(feature_channels: Sequence[int], depths, num_heads, window_size,
                  shifted_windows) -> PyramidShape:
    """Check PCT-Net's shape settings and spread them over the transformer levels.

    ``depths`` and ``num_heads`` take 3 values, ``window_size`` and ``shifted_windows`` one (every
    level) or 3; ``feature_channels`` 5, of which each of the last 3 is divisible by its level's heads.
    Raises :class:`~volumefusion.typed_config.ConfigError` naming the ``model.`` field.
    """
    channels = _values(feature_channels)
    if len(channels) != LEVELS:
        raise ConfigError(f"model.feature_channels: PCT-Net needs {LEVELS} levels, got {list(channels)}")
    depths, num_heads = _values(depths), _values(num_heads)
    for key, values in (("depths", depths), ("num_heads", num_heads)):
        if len(values) != PYRAMID:
            raise ConfigError(f"model.{key}: {list(values)} has {len(values)} values; PCT-Net needs {PYRAMID} "
                              "(levels 1/4, 1/8, 1/16)")
    per_level = []
    for key, value in (("window_size", window_size), ("shifted_windows", shifted_windows)):
        values = _values(value)
        if len(values) not in (1, PYRAMID):
            raise ConfigError(f"model.{key}: {list(values)} has {len(values)} values; PCT-Net needs one "
                              "(every level) or 3 (levels 1/4, 1/8, 1/16)")
        per_level.append(values * PYRAMID if len(values) == 1 else values)
    for c, h in zip(channels[LEVELS - PYRAMID:], num_heads):
        if c % h:
            raise ConfigError(f"model.num_heads: {h} heads do not divide {c} channels")
    return PyramidShape(depths, num_heads, *per_level)
