"""Engine overhead: samples/s of `Trainer.fit` (loading, logging, checkpoints included) against the
bare training step on a batch already in memory: the task's own input pipeline on the device
(normalisation, Volume Fusion), forward, loss, backward and optimiser step.

Both use the same model, batch, precision and device; overhead = 1 - engine / bare, i.e. what the
engine adds to the method's own computation (on a CPU with ``data.workers=0`` that includes reading
the crops inline).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from volumefusion import config
from volumefusion.data.phantoms import write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.device import autocast, autocast_dtype
from volumefusion.preprocess import PrepareSettings
from volumefusion.train.engine import Trainer
from volumefusion.train.losses import DeepSupervisionLoss
from volumefusion.train.runs import build_model
from volumefusion.train.tasks import PretrainTask


def _settings(tiny: bool, device: str) -> tuple[list[str], tuple[int, int, int], int]:
    if tiny:
        return (["model.feature_channels=[4,8,16,32,64]", "model.num_heads=[2,4,8]", "data.crop_size=[16,32,32]",
                 "run.batch_size=2"], (24, 48, 48), 4)
    if device.startswith("cuda"):
        return (["run.batch_size=8", "data.workers=8"], (128, 256, 256), 30)
    return (["model.feature_channels=[8,16,32,64,128]", "model.num_heads=[2,4,8]", "data.crop_size=[32,64,64]",
             "run.batch_size=2", "data.workers=0"], (64, 128, 128), 30)


def bare_samples_per_s(cfg, task, steps: int, device: torch.device) -> float:
    model = build_model(cfg, task.num_classes).to(device)
    loss_fn = DeepSupervisionLoss(task.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    batch = next(iter(task.batches(0, 0, 1)))
    dtype = autocast_dtype(cfg.run.precision, device)
    generator = torch.Generator().manual_seed(0)

    def step():
        x, y = task.make_inputs(batch, generator, device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.run.batch_size / (time.perf_counter() - start)


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    overrides, phantom_shape, steps = _settings(tiny, device)
    dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_phantoms(tmp / "raw", seeds=range(4), shape=phantom_shape, with_labels=False)
        prepare([str(f) for f in files], tmp / "store", PrepareSettings())
        # one checkpoint and a few log records within the measured steps, no validation
        cfg = config.load(overrides=overrides + [f"run.device={dev.type}", f"run.max_steps={steps + 1}",
                                                 f"run.log_every={max(1, steps // 3)}",
                                                 f"run.checkpoint_every={steps}",
                                                 "run.val_every=1000000", "run.image_every=1000000"])
        from volumefusion.data.store import Store

        task = PretrainTask(cfg, Store.open(tmp / "store"))
        bare = bare_samples_per_s(cfg, task, steps, dev)
        trainer = Trainer(cfg, build_model(cfg, task.num_classes), task, tmp / "run")
        result = trainer.fit()
        # The first record includes start-up (workers, first step); the later ones are weighted by
        # the steps they cover (the last covers one).
        records = [r for r in result.history if "samples_per_s" in r]
        covered = [(b["step"] - a["step"]) * cfg.run.batch_size for a, b in zip(records, records[1:])]
        seconds = [n / r["samples_per_s"] for n, r in zip(covered, records[1:])]
        engine = sum(covered) / sum(seconds)
    params = {"crop": list(cfg.data.crop_size), "batch": cfg.run.batch_size, "steps": steps,
              "features": list(cfg.model.feature_channels), "workers": cfg.data.workers,
              "threads": torch.get_num_threads()}
    common = {"device": dev.type, "params": params}
    return [
        {"name": "engine_samples_per_s", "value": engine, "unit": "samples/s", "baseline": bare,
         "baseline_name": "bare training step", "ratio": engine / bare, "higher_is_better": True, **common},
        {"name": "engine_overhead_pct", "value": 100 * (1 - engine / bare), "unit": "%", "baseline": None,
         "baseline_name": None, "ratio": None, "higher_is_better": False, **common},
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(json.dumps(run(args.tiny, args.device), indent=1))
