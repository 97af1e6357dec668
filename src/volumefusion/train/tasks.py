"""The two training tasks: Volume Fusion pretraining and supervised segmentation fine-tuning.

A task turns store crops into device batches and knows how to validate; the engine does the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volumefusion import VolumeFusionError
from volumefusion.augment import augment_segmentation
from volumefusion.config import Config
from volumefusion.data.sampling import PretrainLoader, SegmentationLoader
from volumefusion.data.store import Store
from volumefusion.fusion import make_fused_batch, source_shape, uses_views
from volumefusion.infer import sliding_window_inference
from volumefusion.log import get_logger
from volumefusion.nets import main_output
from volumefusion.preprocess import normalise_hu
from volumefusion.train.losses import DeepSupervisionLoss, dice_per_class
from volumefusion.viz import save_montage

log = get_logger(__name__)


def save_prediction_montage(path: Path, inputs: torch.Tensor, labels: torch.Tensor,
                            predictions: torch.Tensor, samples: int = 4) -> None:
    """Middle axial slice of up to ``samples`` inputs, with true and predicted class maps."""
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
        # views (grid mode, or boxes with views) come from larger crops: random resized windows
        crop = source_shape(c.data.crop_size, c.fusion)
        return PretrainLoader(self.store, crop, c.run.batch_size, seed=seed, rank=rank,
                              world_size=world_size, workers=workers, start_step=start_step,
                              pad_value=c.data.pad_value, same_case=c.fusion.mode == "grid",
                              prefetch=c.data.prefetch)

    def batches(self, start_step: int, rank: int, world_size: int):
        return self._loader(start_step, rank, world_size, self.cfg.run.seed, self.cfg.data.workers)

    def make_inputs(self, batch: dict[str, Any], generator: torch.Generator, device: torch.device):
        window = self.cfg.data.hu_window
        background = normalise_hu(batch["background"].to(device, non_blocking=True), window)
        foreground = normalise_hu(batch["foreground"].to(device, non_blocking=True), window)
        out_shape = self.cfg.data.crop_size if uses_views(self.cfg.fusion) else None
        return make_fused_batch(background, foreground, self.cfg.fusion, generator, out_shape=out_shape)

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
                out = main_output(model(x.to(device)))
            y = y.to(device)
            losses.append(loss_fn(out, y).item())
            preds.append(out.argmax(1).cpu())
            refs.append(y.cpu())
        dice = dice_per_class(torch.cat(preds), torch.cat(refs), self.num_classes).numpy()
        metrics = {"loss": float(np.mean(losses)), "score": float(np.nanmean(dice))}
        metrics.update({f"dice_{name}": float(d) for name, d in zip(self.class_names, dice)})
        return metrics

    def data_fingerprint(self) -> None:
        """None: a pretraining may resume on a store that grew (a changed case under a run stops it)."""
        return None

    def checkpoint_info(self) -> dict[str, Any]:
        return {"kind": "pretrain", "num_classes": self.num_classes, "label_names": None,
                "preprocessing": self.store.settings}

    def save_images(self, path: Path, inputs, labels, predictions) -> None:
        save_prediction_montage(path, inputs, labels, predictions)


def split_cases(case_ids: list[str], num_folds: int, fold: int, split_file: str | None = None,
                seed: int = 12345) -> tuple[list[str], list[str]]:
    """Training and validation case ids: fold ``fold`` of a k-fold split by case (fixed seed, so the
    split does not change with the run's seed), or the ``{"train": [...], "val": [...]}`` split file."""
    from volumefusion import VolumeFusionError

    if split_file:
        try:
            split = json.loads(Path(split_file).read_text())
            train, val = list(split["train"]), list(split["val"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VolumeFusionError(f"{split_file}: not a split file with 'train' and 'val' lists ({exc})") from None
        unknown = sorted(set(train + val) - set(case_ids))
        if unknown:
            raise VolumeFusionError(f"{split_file}: cases not in the dataset: {', '.join(unknown[:5])}")
        if not train or not val:
            raise VolumeFusionError(f"{split_file}: the 'train' and 'val' lists must both name cases")
        both = sorted(set(train) & set(val))
        if both:  # allowed for smoke tests on one case, but then validation scores are not held-out
            log.warning("%s: %d case(s) in both train and val (%s): validation is not held-out", split_file,
                        len(both), ", ".join(both[:5]))
        return train, val
    if len(case_ids) < 2:
        raise VolumeFusionError(f"fine-tuning needs at least 2 labelled cases for a split, found {len(case_ids)}")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    folds = np.array_split(order, min(num_folds, len(order)))
    if fold >= len(folds):
        raise VolumeFusionError(f"finetune.fold: {fold}, but {len(order)} cases make only {len(folds)} folds "
                                f"(0 to {len(folds) - 1})")
    val = [str(c) for c in folds[fold]]
    train = [str(c) for c in order if c not in set(val)]
    return train, val


class SegmentationTask:
    """Supervised segmentation on a labelled store: crops with foreground oversampling, on-device
    augmentation, sliding-window validation on whole cases (mean foreground Dice is the score)."""

    def __init__(self, cfg: Config, store: Store, train_ids: list[str], val_ids: list[str]):
        if not store.label_names:
            raise VolumeFusionError(f"{store.path}: store has no labels; prepare a labelled dataset "
                                    "(dataset.json with imagesTr/labelsTr) to fine-tune")
        self.cfg, self.store = cfg, store
        self.train_ids, self.val_ids = train_ids, val_ids
        self.label_names = {int(k): v for k, v in store.label_names.items()}
        self.num_classes = max(self.label_names) + 1
        self.class_names = [self.label_names.get(i, str(i)) for i in range(self.num_classes)]

    def batches(self, start_step: int, rank: int, world_size: int):
        c = self.cfg
        return SegmentationLoader(self.store, self.train_ids, c.data.crop_size, c.run.batch_size, seed=c.run.seed,
                                  foreground_ratio=c.finetune.foreground_ratio, rank=rank, world_size=world_size,
                                  workers=c.data.workers, start_step=start_step, pad_value=c.data.pad_value,
                                  prefetch=c.data.prefetch)

    def make_inputs(self, batch: dict[str, Any], generator: torch.Generator, device: torch.device):
        image = normalise_hu(batch["image"].to(device, non_blocking=True), self.cfg.data.hu_window)
        label = batch["label"].to(device, non_blocking=True)
        image, label = augment_segmentation(image, label, generator, mirror_axes=self.cfg.finetune.mirror_axes)
        return image, label[:, 0].long()

    def validate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        c = self.cfg
        per_case = []
        for case_id in self.val_ids:
            image = torch.from_numpy(np.asarray(self.store.image(case_id)[:], dtype=np.int16))
            image = normalise_hu(image, c.data.hu_window)[None, None]
            probs = sliding_window_inference(model, image, c.data.crop_size, self.num_classes,
                                             overlap=c.finetune.overlap, window_batch=c.finetune.window_batch,
                                             device=device, precision=c.run.precision)
            label = torch.from_numpy(np.asarray(self.store.label(case_id)[:], dtype=np.int64))
            per_case.append(dice_per_class(probs.argmax(0)[None], label[None], self.num_classes).numpy())
        with warnings.catch_warnings():  # a class absent from every validation case has no Dice: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            dice = np.nanmean(np.stack(per_case), axis=0)
            metrics = {"score": float(np.nanmean(dice[1:]))}
        metrics.update({f"dice_{name}": float(d) for name, d in zip(self.class_names[1:], dice[1:])})
        return metrics

    def data_fingerprint(self) -> dict[str, Any]:
        """Which cases train and validate, and their stored contents: a resumed run must see the same."""
        digest = hashlib.sha256()
        for role, ids in (("train", self.train_ids), ("val", self.val_ids)):
            for case_id in sorted(ids):
                digest.update(f"{role} {case_id} {self.store.info(case_id).checksum}\n".encode())
        return {"train": len(self.train_ids), "val": len(self.val_ids), "sha256": digest.hexdigest()}

    def checkpoint_info(self) -> dict[str, Any]:
        return {"kind": "segmentation", "num_classes": self.num_classes,
                "label_names": {str(k): v for k, v in self.label_names.items()},
                "preprocessing": self.store.settings}

    def save_images(self, path: Path, inputs, labels, predictions) -> None:
        save_prediction_montage(path, inputs, labels, predictions)
