"""The demo's settings: typed and checked by the machinery of :mod:`volumefusion.config`.

A demo settings file (the bundled preset ``demo.yaml``) has the sections of :class:`DemoSettings`
plus ``quick``, a partial copy of the others applied on top for ``--quick``. The ``pretrain`` and
``finetune`` sections are run configs (``volumefusion config --fields``): ``pretrain`` goes over the
``pretrain_config`` preset (the config of the built-in weights), ``finetune`` over that preset's
``model`` and ``data`` sections, so every arm fine-tunes the same architecture on the same
intensities. Both are validated when the settings load, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from volumefusion.config import (
    Config,
    ConfigError,
    build_dataclass,
    from_dict,
    load,
    merge,
    resolve_path,
    setting,
    to_dict,
)

DEFAULT_SETTINGS = "demo"
"""The bundled preset ``volumefusion/configs/demo.yaml``."""

ARMS = ("scratch", "builtin", "live")
"""Fine-tuning arms: random initialisation; the built-in weights; weights pretrained by the demo itself."""

SEED_BASE = {"pool": 1000, "train": 2000, "val": 2500, "test": 3000}
"""Phantom seeds of each role start here, so pool, training, validation and test phantoms differ.
The built-in weights were pretrained on phantoms 10000 and up (docs/weights.md); recipe development
used 5000 and up."""


@dataclass
class PhantomSettings:
    shape: tuple[int, int, int] = setting((16, 48, 48), "phantom size (z, y, x) in voxels", min=4)
    spacing_zyx: tuple[float, float, float] = setting((10.0, 7.5, 7.5), "voxel size (z, y, x) in mm", min=0.1)
    pool: int = setting(24, "unlabelled phantoms of the live pretraining (seeds 1000, ...)", min=0)
    train: int = setting(4, "labelled training phantoms (seeds 2000, ...); a regime uses the first n", min=1)
    val: int = setting(1, "labelled validation phantoms: choose best.pt (seeds 2500, ...)", min=1)
    test: int = setting(8, "held-out labelled phantoms scored in the report (seeds 3000, ...)", min=1)
    chest_ct: bool = setting(True, "add the slicerio chest CT to the live pool when it is installed")


@dataclass
class ProtocolSettings:
    seeds: tuple[int, ...] = setting((0, 1, 2, 3, 4, 5), "fine-tuning seeds: one run per seed, arm and regime",
                                     min=0)
    labelled: tuple[int, ...] = setting((1, 4), "label regimes: labelled training phantoms per run", min=1)
    builtin: str = setting("builtin:demo", "weights of the 'builtin' arm (a checkpoint or builtin:NAME)")
    primary: int = setting(1, "the regime (labelled phantoms) of the pre-registered test")
    alternative: str = setting("greater", "Wilcoxon signed-rank test of builtin - scratch mean Dice: greater "
                               "(builtin better, one-sided) or two-sided", choices=("greater", "two-sided"))
    alpha: float = setting(0.05, "significance level of the test", min=0.0, max=1.0)
    bootstrap: int = setting(10000, "bootstrap resamples of the 95% interval of the mean paired difference",
                             min=100)
    bootstrap_seed: int = setting(0, "seed of the bootstrap resampling", min=0)


@dataclass
class DemoSettings:
    phantoms: PhantomSettings = field(default_factory=PhantomSettings)
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    pretrain_config: str = setting("pretrain_demo", "config (file or preset) of the built-in weights; the live "
                                   "pretraining and every fine-tuning run share its model and data sections")
    pretrain: dict[str, Any] = setting({}, "live pretraining: config over pretrain_config")
    finetune: dict[str, Any] = setting({}, "fine-tuning (every arm): config over pretrain_config's model and data")

    def pretrain_run_config(self) -> Config:
        """The resolved config of the live pretraining."""
        return from_dict(merge(to_dict(load([self.pretrain_config])), self.pretrain))

    def finetune_run_config(self) -> Config:
        """The resolved config of every fine-tuning run (seed and split are set per run)."""
        base = to_dict(load([self.pretrain_config]))
        return from_dict(merge(merge(to_dict(Config()), {"model": base["model"], "data": base["data"]}),
                               self.finetune))


def load_settings(path: str | Path | None = None, quick: bool = False,
                  seeds: list[int] | None = None) -> DemoSettings:
    """The demo settings from ``path`` (default :data:`DEFAULT_SETTINGS`), with the ``quick`` section
    applied when ``quick``, and ``seeds`` replacing ``protocol.seeds`` when given.

    Raises :class:`~volumefusion.config.ConfigError` naming the file and the field for anything the
    demo could not run with, including invalid run configs.
    """
    path = resolve_path(path or DEFAULT_SETTINGS)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    quick_part = data.pop("quick", None) or {}
    if quick:
        data = merge(data, quick_part)
    if seeds:
        data = merge(data, {"protocol": {"seeds": list(seeds)}})
    try:
        settings = build_dataclass(DemoSettings, data)
        _check(settings)
        settings.pretrain_run_config()
        settings.finetune_run_config()
    except ConfigError as exc:
        raise ConfigError(f"{path}{' (quick)' if quick else ''}: {exc}") from None
    return settings


def _check(s: DemoSettings) -> None:
    p, r = s.phantoms, s.protocol
    if p.pool + int(p.chest_ct) < 2:
        raise ConfigError(f"phantoms.pool: {p.pool}; Volume Fusion needs at least 2 pool volumes")
    if not r.seeds or len(set(r.seeds)) != len(r.seeds):
        raise ConfigError(f"protocol.seeds: {list(r.seeds)} must name distinct seeds")
    if max(r.labelled) > p.train:
        raise ConfigError(f"protocol.labelled: {list(r.labelled)} asks for more labelled phantoms than "
                          f"phantoms.train ({p.train})")
    if r.primary not in r.labelled:
        raise ConfigError(f"protocol.primary: {r.primary} is not one of the regimes {list(r.labelled)}")
