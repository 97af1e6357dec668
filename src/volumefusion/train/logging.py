"""Run records: ``metrics.jsonl``, TensorBoard (when installed) and ``progress.png``.

Only the main process writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from volumefusion.files import atomic_write_text
from volumefusion.log import get_logger
from volumefusion.viz import save_curves

log = get_logger(__name__)

PLOT_INTERVAL_S = 60.0
"""Least time between two redraws of ``progress.png`` during training (the last one is always drawn)."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Appends records to ``out_dir/metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, records written after the checkpoint's step are dropped so the file reads as one run.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self._tb = None
        self._plotted = -math.inf
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step or None)
        except ImportError:
            log.debug("tensorboard not installed: metrics go to metrics.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a") as f:
            # NaN (e.g. the Dice of a class absent from validation) as null: strict JSON for jq and browsers
            f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in record.items()}) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def plot(self, force: bool = True) -> None:
        """Redraw ``progress.png``: loss, validation Dice per class, the probe (when a pretraining probes its
        checkpoints), learning rate, throughput.

        Drawing takes about a second of CPU, so unless ``force`` it is skipped when the last drawing
        is less than :data:`PLOT_INTERVAL_S` old (the training loop calls it after each validation).
        """
        if not self.enabled or not self.records:
            return
        now = time.monotonic()
        if not force and now - self._plotted < PLOT_INTERVAL_S:
            return
        self._plotted = now
        def series(key: str) -> list[tuple[float, float]]:
            return [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]

        keys = sorted({k for r in self.records for k in r})
        panels = {
            "loss": {"train": series("loss"), "validation": series("val_loss")},
            "validation Dice": {k.removeprefix("val_dice_"): series(k) for k in keys if k.startswith("val_dice_")},
            "probe: held-out Dice, encoder frozen": {"pretrained encoder": series("probe_score"),
                                                    "random encoder": series("probe_random")},
            "learning rate": {"lr": series("lr")},
            "throughput (samples/s)": {"samples/s": series("samples_per_s")},
        }
        panels = {title: {k: v for k, v in group.items() if v} for title, group in panels.items()}
        save_curves(self.out_dir / "progress.png", {t: g for t, g in panels.items() if g})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
