"""What the demo measured: one fine-tuning run, the live pretraining, the whole demo."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RunResult:
    """What one fine-tuning run measured. ``dice``: ``{organ: {case: Dice}}`` on the held-out phantoms;
    ``curve``: ``[(step, validation mean Dice), ...]`` on the validation phantom."""

    seed: int
    arm: str
    labelled: int
    seconds: float
    best_score: float | None
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def organ_dice(self) -> dict[str, float]:
        """Mean Dice over the held-out phantoms, per organ."""
        return {organ: float(np.mean(list(cases.values()))) for organ, cases in self.dice.items()}

    @property
    def mean_dice(self) -> float:
        """Mean over organs of :attr:`organ_dice`."""
        return float(np.mean(list(self.organ_dice.values())))

    def to_dict(self) -> dict:
        return {**asdict(self), "organ_dice": self.organ_dice, "mean_dice": self.mean_dice}


@dataclass
class PretrainResult:
    """The live pretraining: its run folder and validation records (``metrics.jsonl`` rows with
    ``val_score``, the pretext Dice, and ``val_dice_a<i>`` per fusion level)."""

    run_dir: Path
    seconds: float
    validation: list[dict]


@dataclass
class DemoResult:
    out: Path
    report: Path
    runs: list[RunResult]
    pretraining: PretrainResult
    seconds: float
