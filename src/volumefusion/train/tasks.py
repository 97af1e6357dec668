"""The two training tasks: Volume Fusion pretraining and supervised segmentation fine-tuning.

A task turns store crops into device batches and knows how to validate; the engine does the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volumefusion.config import Config
from volumefusion.data.sampling import PretrainLoader, SegmentationLoader
from volumefusion.data.store import Store
from volumefusion.fusion import make_fused_batch
from volumefusion.preprocess import normalise_hu
from volumefusion.train.losses import DeepSupervisionLoss, dice_per_class


def _first(outputs):
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def save_prediction_montage(path: Path, inputs: torch.Tensor, labels: torch.Tensor,
                            predictions: torch.Tensor, samples: int = 4) -> None:
    """Middle axial slice of up to ``samples`` inputs, with true and predicted class maps."""
    from volumefusion.viz import save_montage

    n = min(samples, inputs.shape[0])
    mid = inputs.shape[2] // 2
    image = [inputs[i, 0, mid].float().cpu().numpy() for i in range(n)]
    true = [labels[i, mid].cpu().numpy() for i in range(n)]
    pred = [predictions[i, mid].cpu().numpy() for i in range(n)]
    save_montage(path, [("input", image, "image"), ("target", true, "label"), ("prediction", pred, "label")])


class PretrainTask:
    """Volume Fusion: fuse two normalised crops of different cases; predict the fusion class map."""

    def __init__(self, cfg: Config, store: Store):
        self.cfg, self.store = cfg, store
        self.num_classes = cfg.fusion.num_classes
        self.class_names = [f"a{i}" for i in range(self.num_classes)]  # alpha = i / K
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _loader(self, start_step: int, rank: int, world_size: int, seed: int, workers: int) -> PretrainLoader:
        c = self.cfg
        return PretrainLoader(self.store, c.data.crop_size, c.run.batch_size, seed=seed, rank=rank,
                              world_size=world_size, workers=workers, start_step=start_step,
                              pad_value=c.data.pad_value, same_case=c.fusion.mode == "grid")

    def batches(self, start_step: int, rank: int, world_size: int):
        return self._loader(start_step, rank, world_size, self.cfg.run.seed, self.cfg.data.workers)

    def make_inputs(self, batch: dict[str, Any], generator: torch.Generator, device: torch.device):
        window = self.cfg.data.hu_window
        background = normalise_hu(batch["background"].to(device, non_blocking=True), window)
        foreground = normalise_hu(batch["foreground"].to(device, non_blocking=True), window)
        return make_fused_batch(background, foreground, self.cfg.fusion, generator)

    def _validation_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of fused crops (own seed stream), built once and kept on the CPU."""
        if self._val is None:
            batches = math.ceil(self.cfg.run.val_samples / self.cfg.run.batch_size)
            stream = iter(self._loader(0, 0, 1, seed=self.cfg.run.seed + 7919, workers=0))
            generator = torch.Generator().manual_seed(self.cfg.run.seed + 7919)
            self._val = [self.make_inputs(next(stream), generator, torch.device("cpu")) for _ in range(batches)]
        return self._val

    def validate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        loss_fn = DeepSupervisionLoss(self.num_classes, self.cfg.loss.dice_weight, self.cfg.loss.ce_weight,
                                      deep_supervision=False)
        losses, preds, refs = [], [], []
        for x, y in self._validation_set():
            with autocast():
                out = _first(model(x.to(device)))
            y = y.to(device)
            losses.append(loss_fn(out, y).item())
            preds.append(out.argmax(1).cpu())
            refs.append(y.cpu())
        dice = dice_per_class(torch.cat(preds), torch.cat(refs), self.num_classes).numpy()
        metrics = {"loss": float(np.mean(losses)), "score": float(np.nanmean(dice))}
        metrics.update({f"dice_{name}": float(d) for name, d in zip(self.class_names, dice)})
        return metrics

    def checkpoint_info(self) -> dict[str, Any]:
        return {"kind": "pretrain", "num_classes": self.num_classes, "label_names": None,
                "preprocessing": self.store.settings}

    def save_images(self, path: Path, inputs, labels, predictions) -> None:
        save_prediction_montage(path, inputs, labels, predictions)
