"""The demo's settings: typed and checked by the machinery of :mod:`volumefusion.config`.

A demo settings file (the bundled preset ``demo.yaml``) has the sections of :class:`DemoSettings`
plus ``study`` and ``quick``, partial copies of the others applied on top for ``--study`` (the longer
study: more regimes and arms) and ``--quick`` (a smoke run). The run-config sections
(``volumefusion config --fields``) build on each other:

* ``pretrain`` goes over the ``pretrain_config`` preset (the config of the built-in weights): the
  demo's own short pretraining;
* ``finetune`` goes over that preset's ``model`` and ``data`` sections: what every fine-tuning run
  shares, so every arm fine-tunes the same architecture on the same intensities;
* ``scratch`` and ``pretrained`` go over ``finetune``: the recipe of the arm that starts from random
  weights, and of every arm that starts from pretrained ones (each fixed on development seeds);
* ``probe`` goes over ``pretrained``: the frozen-encoder probes;
* ``control_pretrain`` goes over ``scratch``: the supervised pretraining of the positive control.

All are validated when the settings load, before any work starts; an error names the section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volumefusion.config import (
    Config,
    ConfigError,
    build_dataclass,
    from_dict,
    load,
    merge,
    read_yaml,
    resolve_path,
    setting,
    to_dict,
)

DEFAULT_SETTINGS = "demo"
"""The bundled preset ``volumefusion/configs/demo.yaml``."""

@dataclass(frozen=True)
class Arm:
    """One fine-tuning arm of the demo: what its runs start from and how they are read.

    ``recipe``: the settings section of its fine-tuning runs (``scratch``, ``pretrained``, or ``probe``:
    the encoder held still for the whole run); ``start``: its starting weights (None: random
    initialisation; ``builtin``, ``random`` (a randomly initialised encoder to hold), or the result of
    a pretraining ``stage``); ``stage``: the demo's pretraining stage that must finish first;
    ``baseline``: the arm it is compared with, seed by seed.
    """

    name: str
    text: str
    recipe: str
    start: str | None = None
    stage: str | None = None
    baseline: str | None = "scratch"


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("scratch", "from scratch", "scratch", baseline=None),
    Arm("builtin", "built-in weights", "pretrained", start="builtin"),
    # weights pretrained with Volume Fusion by the demo itself (a short run)
    Arm("live", "live pretraining", "pretrained", start="live", stage="live"),
    # the positive control: pretrained *with labels* on other phantoms: does the set-up detect transfer?
    Arm("control", "positive control", "pretrained", start="control", stage="control"),
    # the built-in encoder, or a random one, held still while the decoder learns: are its features any use?
    Arm("probe_builtin", "probe: built-in encoder", "probe", start="builtin", baseline="probe_random"),
    Arm("probe_random", "probe: random encoder", "probe", start="random", baseline=None),
)}
"""The demo's arms by name; the run, the schedule and the report loop over this table."""

SEED_BASE = {"pool": 1000, "train": 2000, "val": 2500, "test": 3000, "control": 4000, "gate": 9000}
"""Phantom seeds of each role start here (plus ``phantoms.seed_offset``), so no phantom has two
roles. The built-in weights were pretrained on phantoms 10000 and up (docs/weights.md); recipe
development used ``seed_offset: 50000``."""


@dataclass
class PhantomSettings:
    shape: tuple[int, int, int] = setting((32, 64, 64), "phantom size (z, y, x) in voxels", min=4)
    spacing_zyx: tuple[float, float, float] = setting((5.0, 5.6, 5.6), "voxel size (z, y, x) in mm", min=0.1)
    vary: bool = setting(True, "vary the scans as CT varies: size, pose, field of view, contrast phase, "
                         "missing organs, lesions, noise (volumefusion.data.phantoms.make_phantom)")
    seed_offset: int = setting(0, "added to every role's first seed (recipe development uses other phantoms)",
                               min=0)
    pool: int = setting(24, "unlabelled phantoms of the live pretraining (seeds 1000, ...)", min=0)
    train: int = setting(8, "labelled training phantoms (seeds 2000, ...): the full label set", min=1)
    val: int = setting(2, "labelled validation phantoms: the learning curves (seeds 2500, ...)", min=1)
    test: int = setting(8, "held-out labelled phantoms scored in the report (seeds 3000, ...)", min=1)
    control: int = setting(8, "labelled phantoms of the positive control's supervised pretraining "
                           "(seeds 4000, ...; the last one validates it)", min=2)
    gate: int = setting(32, "unlabelled phantoms no pretraining saw: the built-in weights' pretext Dice "
                        "(seeds 9000, ...)", min=1)
    chest_ct: bool = setting(True, "add the slicerio chest CT to the live pool when it is installed")


@dataclass
class ProtocolSettings:
    seeds: tuple[int, ...] = setting((20, 21, 22, 23, 24, 25, 26, 27), "fine-tuning seeds: one run per seed, "
                                     "arm and regime; the seed also chooses which phantoms are labelled", min=0)
    labelled: tuple[int, ...] = setting((8, 1), "label regimes: labelled training phantoms per run", min=1)
    steps: tuple[int, ...] = setting((), "fine-tuning budget of each regime in steps, in the order of labelled "
                                     "(empty: finetune's run.max_steps for every regime)", min=1)
    arms: tuple[str, ...] = setting(("scratch", "builtin"), "arms run in the regime primary_final",
                                    choices=tuple(ARMS))
    other_arms: tuple[str, ...] = setting(("scratch", "builtin"), "arms run in the other regimes",
                                          choices=tuple(ARMS))
    builtin: str = setting("builtin:demo", "weights of the 'builtin' arm (a checkpoint or builtin:NAME)")
    primary_early: int = setting(8, "primary hypothesis (a), faster convergence: builtin vs scratch in this regime "
                                 "(labelled phantoms), early readout (0: none)", min=0)
    primary_final: int = setting(1, "primary hypothesis (b), few labels: builtin vs scratch in this regime, at the "
                                 "end of the budget (0: none)", min=0)
    alternative: str = setting("greater", "Wilcoxon signed-rank test of builtin - scratch mean Dice: greater "
                               "(builtin better, one-sided) or two-sided", choices=("greater", "two-sided"))
    alpha: float = setting(0.05, "significance level of the primary tests, Holm's correction across them",
                           min=0.0, max=1.0)
    bootstrap: int = setting(10000, "bootstrap resamples of the 95% interval of the mean paired difference",
                             min=100)
    bootstrap_seed: int = setting(0, "seed of the bootstrap resampling", min=0)
    early_fraction: float = setting(0.25, "early readout: over the first share of the steps", min=0.01, max=1.0)
    early_points: int = setting(2, "early readout: mean held-out Dice at this many evenly spaced steps up to "
                                "early_fraction (1: at its end only)", min=1)
    stop_early: tuple[int, ...] = setting((8,), "regimes whose runs stop at the early readout (no final readout)",
                                          min=1)
    gate_mean: float = setting(0.6, "gate: least mean pretext Dice of the built-in weights on unseen phantoms",
                               min=0.0, max=1.0)
    gate_level: float = setting(0.3, "gate: least pretext Dice of every fusion level", min=0.0, max=1.0)
    gate_samples: int = setting(64, "gate: fused crops of the unseen phantoms", min=1)
    headroom_gap: float = setting(0.08, "headroom: least mean Dice from scratch of the full label set over "
                                  "the regime primary_final", min=0.0, max=1.0)
    headroom_full: float = setting(0.85, "headroom: least mean Dice from scratch with the full label set",
                                   min=0.0, max=1.0)
    headroom_organ: float = setting(0.6, "headroom: least Dice of every organ from scratch with the full "
                                    "label set", min=0.0, max=1.0)

    def hypotheses(self) -> list[tuple[str, int]]:
        """The primary tests as (readout, regime): ``early`` for (a), ``final`` for (b)."""
        return [(r, n) for r, n in (("early", self.primary_early), ("final", self.primary_final)) if n]

    def arms_of(self, labelled: int) -> tuple[str, ...]:
        """The arms run with ``labelled`` labelled phantoms."""
        return self.arms if labelled == self.primary_final else self.other_arms


@dataclass
class DemoSettings:
    phantoms: PhantomSettings = field(default_factory=PhantomSettings)
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    pretrain_config: str = setting("pretrain_demo", "config (file or preset) of the built-in weights; the live "
                                   "pretraining and every fine-tuning run share its model and data sections")
    pretrain: dict[str, Any] = setting({}, "live pretraining: config over pretrain_config")
    finetune: dict[str, Any] = setting({}, "every fine-tuning run: config over pretrain_config's model and data")
    scratch: dict[str, Any] = setting({}, "the scratch arm's recipe: config over finetune")
    pretrained: dict[str, Any] = setting({}, "the recipe of the arms that start from weights: config over finetune")
    probe: dict[str, Any] = setting({}, "the frozen-encoder probes: config over pretrained")
    control_pretrain: dict[str, Any] = setting({}, "the positive control's supervised pretraining: config "
                                               "over scratch")

    def pretrain_run_config(self) -> Config:
        """The resolved config of the live pretraining."""
        return from_dict(self._sections()["pretrain"])

    def finetune_run_config(self, arm: str = "scratch") -> Config:
        """The resolved config of the fine-tuning runs of ``arm`` (seed and split are set per run)."""
        return from_dict(self._sections()[ARMS[arm].recipe])

    def budget(self, labelled: int) -> int:
        """The fine-tuning steps of the regime with ``labelled`` labelled phantoms."""
        p = self.protocol
        return p.steps[p.labelled.index(labelled)] if p.steps else self.finetune_run_config().run.max_steps

    def early_steps(self, labelled: int) -> tuple[int, ...]:
        """The steps of the early readout of a regime: ``protocol.early_points`` evenly spaced steps up
        to ``protocol.early_fraction`` of its budget (distinct, at least 1)."""
        p = self.protocol
        end = max(1, round(self.budget(labelled) * p.early_fraction))
        return tuple(sorted({max(1, round(end * k / p.early_points)) for k in range(1, p.early_points + 1)}))

    def trained_steps(self, labelled: int) -> int:
        """The steps a run of a regime trains: its budget, or the last early step where it stops early."""
        return self.early_steps(labelled)[-1] if labelled in self.protocol.stop_early else self.budget(labelled)

    def control_run_config(self) -> Config:
        """The resolved config of the positive control's supervised pretraining."""
        return from_dict(self._sections()["control_pretrain"])

    def _sections(self) -> dict[str, dict]:
        """Each run-config section merged over the ones it builds on (see the module docs)."""
        base = to_dict(load([self.pretrain_config]))
        out = {"pretrain": merge(base, self.pretrain),
               "finetune": merge(merge(to_dict(Config()), {"model": base["model"], "data": base["data"]}),
                                 self.finetune)}
        out["scratch"] = merge(out["finetune"], self.scratch)
        out["pretrained"] = merge(out["finetune"], self.pretrained)
        out["probe"] = merge(out["pretrained"], self.probe)
        out["control_pretrain"] = merge(out["scratch"], self.control_pretrain)
        return out

    def check_sections(self) -> None:
        """Validate every run-config section; an error names the section the bad field is in (each
        section is checked after the ones it builds on)."""
        for section, data in self._sections().items():
            try:
                from_dict(data)
            except ConfigError as exc:
                raise ConfigError(f"{section}.{exc}") from None


def load_settings(path: str | Path | None = None, quick: bool = False,
                  seeds: list[int] | None = None, study: bool = False) -> DemoSettings:
    """The demo settings from ``path`` (default :data:`DEFAULT_SETTINGS`), with the ``study`` section
    applied when ``study`` and then the ``quick`` section when ``quick``, and ``seeds`` replacing
    ``protocol.seeds`` when given.

    Raises :class:`~volumefusion.config.ConfigError` naming the file and the field for anything the
    demo could not run with, including invalid run configs.
    """
    path = resolve_path(path or DEFAULT_SETTINGS)
    data = read_yaml(path)
    modes = {"study": study, "quick": quick}  # sections applied on top of the rest, in this order
    parts = {mode: data.pop(mode, None) or {} for mode in modes}
    for mode, wanted in modes.items():
        if wanted:
            data = merge(data, parts[mode])
    if seeds:
        data = merge(data, {"protocol": {"seeds": list(seeds)}})
    try:
        settings = build_dataclass(DemoSettings, data)
        _check(settings)
        settings.check_sections()
    except ConfigError as exc:
        asked = ", ".join(m for m, wanted in modes.items() if wanted)
        raise ConfigError(f"{path}{f' ({asked})' if asked else ''}: {exc}") from None
    return settings


def _check(s: DemoSettings) -> None:
    p, r = s.phantoms, s.protocol
    if "live" in r.arms + r.other_arms and p.pool + int(p.chest_ct) < 2:
        raise ConfigError(f"phantoms.pool: {p.pool}; Volume Fusion needs at least 2 pool volumes")
    if not r.seeds or len(set(r.seeds)) != len(r.seeds):
        raise ConfigError(f"protocol.seeds: {list(r.seeds)} must name distinct seeds")
    if r.steps and len(r.steps) != len(r.labelled):
        raise ConfigError(f"protocol.steps: {list(r.steps)} needs one budget per regime of labelled "
                          f"{list(r.labelled)} (or none)")
    if max(r.labelled) > p.train:
        raise ConfigError(f"protocol.labelled: {list(r.labelled)} asks for more labelled phantoms than "
                          f"phantoms.train ({p.train})")
    for name in ("primary_early", "primary_final"):
        n = getattr(r, name)
        if n and n not in r.labelled:
            raise ConfigError(f"protocol.{name}: {n} is not one of the regimes {list(r.labelled)}")
    if r.primary_final in r.stop_early:
        raise ConfigError(f"protocol.stop_early: {list(r.stop_early)} stops the regime of primary_final "
                          f"({r.primary_final}) before its final readout")
    for name, arms in (("arms", r.arms), ("other_arms", r.other_arms)):
        if not {"scratch", "builtin"} <= set(arms):
            raise ConfigError(f"protocol.{name}: {list(arms)} must hold scratch and builtin (the comparison)")
