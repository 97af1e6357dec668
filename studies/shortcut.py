"""Shortcut diagnostic (issue 29): how much of a Volume Fusion pretext can a tiny *local* model solve?

Trains three 3x3x3 convolutions (16 channels, receptive field 7 voxels: no anatomy, only local
intensity and texture) on the fused crops of each candidate's own config (its run folder's
config.yaml), with the same engine, data stream and loss as the PCT-Net, and reports the pretext
Dice on the same fixed validation crops as the PCT-Net's ``val_score``. A pretext the tiny model
solves nearly as well as the PCT-Net can be solved without anatomy.

Usage: python studies/shortcut.py POOL_STORE OUT_DIR RUN_DIR [RUN_DIR ...] [--steps N]
Prints one JSON line per run: name, tiny model's pretext Dice (mean and per level), the PCT-Net's
last val_score from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from volumefusion.config import load
from volumefusion.data.store import Store
from volumefusion.train.engine import Trainer
from volumefusion.train.logging import read_metrics
from volumefusion.train.tasks import PretrainTask


class LocalNet(nn.Module):
    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True),
            nn.Conv3d(width, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True),
            nn.Conv3d(width, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool")
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    for run in map(Path, args.runs):
        cfg = load([run / "config.yaml"])
        cfg.run.max_steps, cfg.run.val_every = args.steps, args.steps
        cfg.run.checkpoint_every, cfg.run.keep_last, cfg.run.image_every = args.steps, 0, 10**9
        cfg.loss.deep_supervision = False
        cfg.optim.lr = 1e-2
        task = PretrainTask(cfg, Store.open(args.pool))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = Path(args.out) / run.name
        result = Trainer(cfg, LocalNet(task.num_classes), task, out).fit()
        tiny = [r for r in result.history if "val_score" in r][-1]
        pct = [r for r in read_metrics(run / "metrics.jsonl") if "val_score" in r] or [{"step": 0, "val_score": 0.0}]
        pct = pct[-1]
        print(json.dumps({"run": run.name, "steps": args.steps, "seconds": round(time.perf_counter() - t0),
                          "tiny": {k.removeprefix("val_"): round(v, 4) for k, v in tiny.items()
                                   if k.startswith("val_dice") or k == "val_score"},
                          "pctnet_step": pct["step"], "pctnet_score": round(pct["val_score"], 4),
                          "pctnet": {k.removeprefix("val_"): round(v, 4) for k, v in pct.items()
                                     if k.startswith("val_dice")}}), flush=True)


if __name__ == "__main__":
    main()
