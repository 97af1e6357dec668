"""Assemble a run from a config: model, task, trainer. Used by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path

import torch

from volumefusion import VolumeFusionError
from volumefusion.config import Config, save
from volumefusion.log import get_logger
from volumefusion.train.engine import DistInfo, FitResult, Trainer

log = get_logger(__name__)


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The configured network, initialised from ``run.seed``; checks the crop fits its down-sampling."""
    from volumefusion.nets import build_model as build

    torch.manual_seed(cfg.run.seed)
    model = build(cfg.model, num_classes)
    bad = [c for c, d in zip(cfg.data.crop_size, model.size_divisor) if c % d]
    if bad:
        raise VolumeFusionError(
            f"data.crop_size: {list(cfg.data.crop_size)} must be divisible by the network's down-sampling "
            f"{list(model.size_divisor)} on every axis")
    # Dropout and drop-path draws differ per rank but are reproducible per rank.
    torch.manual_seed(cfg.run.seed * 1009 + DistInfo.from_env().rank + 1)
    return model


def write_config(cfg: Config, out_dir: str | Path) -> None:
    if DistInfo.from_env().is_main:
        save(cfg, Path(out_dir) / "config.yaml")


def pretrain(cfg: Config, data: str | Path, out_dir: str | Path, resume: bool | str = False) -> FitResult:
    """Volume Fusion pretraining on the store at ``data``; outputs in ``out_dir``."""
    from volumefusion.data.store import Store
    from volumefusion.train.tasks import PretrainTask

    task = PretrainTask(cfg, Store.open(data))
    model = build_model(cfg, task.num_classes)
    write_config(cfg, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining %s (%.2f M parameters) on %d cases, %s", cfg.model.name, n_params / 1e6,
             len(task.store), f"fusion {cfg.fusion.mode}, K={cfg.fusion.num_classes - 1}")
    return Trainer(cfg, model, task, out_dir, resume=resume).fit()
