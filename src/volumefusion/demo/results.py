"""What the demo measured: the gate, one fine-tuning run, a pretraining stage, the whole demo.

Each result is written beside its run as JSON when it is measured, so an interrupted demo keeps
what it finished and a rerun of the same command picks it up (:meth:`RunResult.from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def _mean_dice(dice: dict[str, dict[str, float]]) -> tuple[dict[str, float], float]:
    organs = {organ: float(np.mean(list(cases.values()))) for organ, cases in dice.items()}
    return organs, float(np.mean(list(organs.values()))) if organs else float("nan")


def run_folder(out: Path, labelled: int, seed: int, arm: str) -> Path:
    """The folder of one fine-tuning run of the demo in ``out`` (its ``result.json`` once finished)."""
    return out / "runs" / f"{labelled}labelled" / f"seed{seed}" / arm


@dataclass
class RunResult:
    """What one fine-tuning run measured. ``dice``: ``{organ: {case: Dice}}`` of the final weights on
    the held-out phantoms (empty for a run stopped at the early readout); ``early``: ``{step: dice}``,
    the same after each step of the early readout; ``curve``: ``[(step, validation mean Dice), ...]``
    on the validation phantoms."""

    seed: int
    arm: str
    labelled: int
    seconds: float
    best_score: float | None
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    early: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def organ_dice(self) -> dict[str, float]:
        """Mean Dice over the held-out phantoms, per organ."""
        return _mean_dice(self.dice)[0]

    @property
    def mean_dice(self) -> float:
        """Mean over organs of :attr:`organ_dice`."""
        return _mean_dice(self.dice)[1]

    @property
    def early_step(self) -> int:
        """The last step of the early readout."""
        return max(map(int, self.early), default=0)

    @property
    def early_curve(self) -> dict[str, float]:
        """``{step: mean Dice}`` of the weights at each step of the early readout."""
        return {step: _mean_dice(dice)[1] for step, dice in self.early.items()}

    @property
    def early_mean_dice(self) -> float:
        """The early readout: the mean of :attr:`early_curve`."""
        return float(np.mean(list(self.early_curve.values()))) if self.early else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "organ_dice": self.organ_dice, "mean_dice": self.mean_dice,
                "early_curve": self.early_curve, "early_mean_dice": self.early_mean_dice}

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        names = {f for f in cls.__dataclass_fields__}
        run = cls(**{k: v for k, v in d.items() if k in names})
        run.curve = [tuple(point) for point in run.curve]
        return run


@dataclass
class PretrainResult:
    """A pretraining stage of the demo (the live Volume Fusion run, or the positive control's
    supervised run): its run folder, seconds, steps and validation records (``metrics.jsonl`` rows
    with ``val_score``; Volume Fusion adds ``val_dice_a<i>`` per fusion level)."""

    run_dir: Path
    seconds: float
    steps: int
    validation: list[dict]


@dataclass
class GateResult:
    """The pretext Dice of the built-in weights on fused crops of phantoms no pretraining saw:
    ``levels`` ``{"a0": Dice, ...}`` per fusion level, ``mean`` over levels, and whether it passed
    (``mean >= mean_floor`` and every level ``>= level_floor``)."""

    levels: dict[str, float]
    mean: float
    mean_floor: float
    level_floor: float
    samples: int
    phantoms: int

    @property
    def passed(self) -> bool:
        return self.mean >= self.mean_floor and min(self.levels.values()) >= self.level_floor

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        return cls(**{k: v for k, v in d.items() if k != "passed"})


@dataclass
class DemoResult:
    out: Path
    report: Path
    runs: list[RunResult]
    gate: GateResult
    pretraining: dict[str, PretrainResult]
    seconds: float
