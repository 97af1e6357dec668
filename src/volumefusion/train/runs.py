"""Assemble a run from a config: model, task, trainer. Used by the CLI and the demo."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from volumefusion import VolumeFusionError, nets
from volumefusion.checkpoint import Checkpoint, read_checkpoint
from volumefusion.config import Config, changed_fields, load, save, to_dict
from volumefusion.data.prepare import prepare
from volumefusion.data.store import Store
from volumefusion.device import autocast, resolve_device
from volumefusion.files import atomic_write_text, check_writable_folder, folder_lock
from volumefusion.log import get_logger
from volumefusion.preprocess import PrepareSettings
from volumefusion.train.engine import DistInfo, FitResult, Trainer, run_device
from volumefusion.train.tasks import PretrainTask, SegmentationTask, split_cases
from volumefusion.weights import LoadReport, load_pretrained, model_from_checkpoint

log = get_logger(__name__)

# Model fields fine-tuning may set differently from the pretrained checkpoint: regularisation and
# run-time switches, the input channels (the first convolution is adapted) and the relative-position
# index (the weights carry it).
ADJUSTABLE_MODEL_FIELDS = frozenset({
    "model.dropout", "model.drop_path", "model.deep_supervision", "model.activation_checkpointing",
    "model.in_channels", "model.rel_pos_index",
})


def check_model_settings(cfg: Config) -> None:
    """Errors for settings the data cannot meet: input channels other than CT's one, a crop the
    network's down-sampling does not divide, a crop so small that normalisation in training sees a
    single value per channel at the coarsest level (checked on the meta device: no memory, no time)."""
    if cfg.model.in_channels != 1:
        raise VolumeFusionError(f"model.in_channels: {cfg.model.in_channels}, but prepared stores hold "
                                "single-channel CT; set it to 1 (pretrained weights with other input channels "
                                "are adapted when fine-tuning)")
    with torch.device("meta"):
        model = nets.build_model(cfg.model, 2)
    divisor, crop = model.size_divisor, list(cfg.data.crop_size)
    if any(c % d for c, d in zip(crop, divisor)):
        raise VolumeFusionError(
            f"data.crop_size: {crop} must be divisible by the network's down-sampling {list(divisor)} on every axis")
    # Batch norm needs two values per channel in a batch, instance norm two per sample.
    per_sample = any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in model.modules())
    batch = 1 if per_sample else cfg.run.batch_size
    if batch * math.prod(c // d for c, d in zip(crop, divisor)) < 2:
        smallest = list(divisor)
        smallest[smallest.index(min(smallest))] *= 2
        raise VolumeFusionError(
            f"data.crop_size: {crop} is the network's down-sampling {list(divisor)}, one voxel at its coarsest "
            f"level, where its normalisation needs more than one value per channel in training"
            + ("" if per_sample else f" (run.batch_size {cfg.run.batch_size})")
            + f": the smallest crop it takes is twice that on one axis, e.g. {smallest}"
            + ("" if per_sample else ", or use run.batch_size 2 or more"))


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The configured network, initialised from ``run.seed``, after :func:`check_model_settings`."""
    check_model_settings(cfg)
    torch.manual_seed(cfg.run.seed)
    model = nets.build_model(cfg.model, num_classes)
    # Dropout and drop-path draws differ per rank but are reproducible per rank.
    torch.manual_seed(cfg.run.seed * 1009 + DistInfo.from_env().rank + 1)
    return model


def check_run_folder(out_dir: str | Path, resume: bool | str) -> None:
    """A new run (no ``resume``) must not start in a folder that holds another run's checkpoints:
    the two runs' files would mix and ``keep_last`` would delete the wrong ones."""
    found = sorted((Path(out_dir) / "checkpoints").glob("*.pt"))
    if found and not resume:
        raise VolumeFusionError(f"{out_dir} already holds a run ({len(found)} checkpoint(s), e.g. {found[0].name}); "
                                "continue it with --resume, or choose another --out folder")


def one_run_per_folder(run):
    """Decorate a run function with an ``out_dir`` argument: its folder is checked writable, then held for
    the whole run (:func:`volumefusion.files.folder_lock`, by the main process under DDP), so a second
    run into it is refused in one line instead of mixing the two runs' files."""

    @functools.wraps(run)
    def held(*args, **kwargs):
        out_dir = inspect.signature(run).bind(*args, **kwargs).arguments["out_dir"]
        check_writable_folder(out_dir, "--out")
        with folder_lock(out_dir) if DistInfo.from_env().is_main else contextlib.nullcontext():
            return run(*args, **kwargs)

    return held


def write_config(cfg: Config, out_dir: str | Path) -> None:
    """``out_dir/config.yaml``, written once the run (and any resume) is set up."""
    if DistInfo.from_env().is_main:
        save(cfg, Path(out_dir) / "config.yaml")


@one_run_per_folder
def pretrain(cfg: Config, data: str | Path, out_dir: str | Path, resume: bool | str = False,
             on_checkpoint: tuple[int, Callable[[Path, int], dict[str, float]]] | None = None) -> FitResult:
    """Volume Fusion pretraining on the store at ``data``; outputs in ``out_dir``. ``on_checkpoint``: as
    in :class:`~volumefusion.train.engine.Trainer` (:func:`volumefusion.train.probe.probe_hook`)."""
    check_run_folder(out_dir, resume)
    task = PretrainTask(cfg, Store.open(data))
    model = build_model(cfg, task.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining %s (%.2f M parameters) on %d cases, %s", cfg.model.name, n_params / 1e6,
             len(task.store), f"fusion {cfg.fusion.mode}, K={cfg.fusion.num_classes - 1}")
    trainer = Trainer(cfg, model, task, out_dir, resume=resume, on_checkpoint=on_checkpoint)
    write_config(cfg, out_dir)
    return trainer.fit()


def evaluate_pretext(checkpoint: str | Path | Checkpoint, data: str | Path, *, samples: int = 64, seed: int = 0,
                     device: str = "cpu") -> dict[str, float]:
    """The Volume Fusion pretext Dice of a pretraining ``checkpoint`` (a file, ``builtin:NAME`` or a
    :class:`~volumefusion.checkpoint.Checkpoint`) on fused crops of the store at ``data`` (e.g. volumes
    no pretraining saw), under the checkpoint's own crop size and fusion settings.

    ``samples`` fused crops are drawn from ``seed`` (the same crops for every checkpoint of one
    config). Returns ``{"score": mean Dice over the K+1 fusion levels, "dice_a<i>": Dice of level i
    (alpha = i / K), "loss": Dice + CE}``.
    """
    ckpt = read_checkpoint(checkpoint)
    if ckpt.layout != "volumefusion" or ckpt.task.get("kind") != "pretrain":
        raise ckpt.error("not a Volume Fusion pretraining checkpoint")
    model, cfg, _ = model_from_checkpoint(ckpt)
    cfg.run.val_samples, cfg.run.seed = samples, seed
    dev = resolve_device(device, setting="device")
    task = PretrainTask(cfg, Store.open(data))
    model.to(dev).eval()
    with torch.no_grad():
        return task.validate(model, dev, lambda: autocast(dev, None))


def _pretrained_base(pretrained: str | Path | None) -> tuple[Checkpoint | None, dict]:
    """The checkpoint (or None) and the config it imposes on fine-tuning (model and intensity)."""
    if pretrained is None:
        return None, {}
    ckpt = read_checkpoint(pretrained)
    if ckpt.layout == "misfm":
        return ckpt, {"model": ckpt.config["model"]}
    ckpt.require("finetune starts from a volumefusion checkpoint (keys 'model' and 'config') or a MIS-FM one "
                 "('model_state_dict')", "config")
    saved = to_dict(ckpt.run_config())
    return ckpt, {"model": saved["model"], "data": {"hu_window": saved["data"]["hu_window"]}}


def segmentation_store(data: str | Path, out_dir: Path, preprocessing: dict | None, workers: int):
    """Open ``data`` as a labelled store, preparing it first (into OUT/store) when it is a raw dataset.

    ``preprocessing``: the pretrained checkpoint's preparation settings, which the store must match.
    """
    data = Path(data)
    if (data / "dataset.json").is_file():
        settings = PrepareSettings.from_dict(preprocessing) if preprocessing else PrepareSettings()
        if DistInfo.from_env().is_main:
            summary = prepare([str(data)], out_dir / "store", settings, workers=max(1, workers))
            if summary.failed:
                log.warning("%d case(s) could not be prepared and are left out", len(summary.failed))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        data = out_dir / "store"
    store = Store.open(data)
    if preprocessing:
        mismatch = {k: (store.settings.get(k), v) for k, v in preprocessing.items() if store.settings.get(k) != v}
        if mismatch:
            detail = "; ".join(f"{k}: store {a!r} vs pretraining {b!r}" for k, (a, b) in mismatch.items())
            raise VolumeFusionError(f"{data}: store preparation differs from the pretrained model's ({detail}); "
                                    "prepare the dataset again with the pretraining settings, or pass the raw "
                                    "dataset folder so it is prepared automatically")
    return store


@dataclass
class FinetuneResult(FitResult):
    """What :func:`finetune` did: the run (:class:`FitResult`) and how the pretrained weights loaded
    (None from scratch; also written to ``OUT/load_report.json``)."""

    load_report: LoadReport | None = None


@one_run_per_folder
def finetune(cfg_paths: list[str], overrides: list[str], data: str | Path, out_dir: str | Path,
             pretrained: str | Path | None, resume: bool | str = False) -> FinetuneResult:
    """Fine-tune on a labelled dataset from ``pretrained`` weights (a checkpoint file or ``builtin:NAME``;
    from scratch with ``None``).

    The pretrained checkpoint fixes the architecture and the intensity window; asking for a different
    window is an error, so pretraining and fine-tuning intensities can never silently differ.
    """
    out_dir = Path(out_dir)
    check_run_folder(out_dir, resume)
    ckpt, base = _pretrained_base(pretrained)
    cfg = load(cfg_paths, overrides, base=base)
    if "model" in base:
        changes = changed_fields(base, cfg, ("model",), ignore=ADJUSTABLE_MODEL_FIELDS)
        if changes:
            raise VolumeFusionError(
                f"{pretrained}: the config changes the pretrained architecture ({'; '.join(changes)}), so most "
                "weights could not be used; the architecture comes from the checkpoint: leave these fields out "
                "of the config, or fine-tune from scratch with --pretrained none")
    if "data" in base and list(cfg.data.hu_window) != list(base["data"]["hu_window"]):
        raise VolumeFusionError(f"data.hu_window: {list(cfg.data.hu_window)} differs from the pretrained model's "
                                f"{list(base['data']['hu_window'])}; fine-tuning must use the same intensities")
    if ckpt is not None and cfg.model.in_channels != 1 and cfg.model.in_channels == base["model"].get("in_channels"):
        log.info("the pretrained model takes %d input channels: its first convolution is adapted to the one "
                 "CT channel", cfg.model.in_channels)
        cfg.model.in_channels = 1
    # what can fail without the data fails before the dataset is prepared (minutes to hours)
    check_model_settings(cfg)
    if ckpt is not None:  # shapes only, on the meta device: no memory, no time
        with torch.device("meta"):
            load_pretrained(nets.build_model(cfg.model, 2), ckpt, cfg.finetune.partial_load)
    run_device(cfg)
    if cfg.finetune.split_file and not Path(cfg.finetune.split_file).is_file():
        raise VolumeFusionError(f"--split {cfg.finetune.split_file}: file not found")
    preprocessing = ckpt.preprocessing if ckpt is not None else None
    store = segmentation_store(data, out_dir, preprocessing, cfg.data.workers)
    f = cfg.finetune
    train_ids, val_ids = split_cases(store.ids, f.num_folds, f.fold, f.split_file)
    task = SegmentationTask(cfg, store, train_ids, val_ids)
    model = build_model(cfg, task.num_classes)
    report = None
    if ckpt is not None:
        report = load_pretrained(model, ckpt, cfg.finetune.partial_load)
        # the index travels in the weights; the saved config must say which one they use
        if report.rel_pos_index:
            cfg.model.rel_pos_index = report.rel_pos_index
        log.info("%s (load_report.json)", report.format().splitlines()[0])
        if DistInfo.from_env().is_main:
            atomic_write_text(out_dir / "load_report.json", json.dumps(report.to_dict(), indent=1))
    log.info("fine-tuning %s on %d training / %d validation cases, %d classes (%s)", cfg.model.name,
             len(train_ids), len(val_ids), task.num_classes, "pretrained" if ckpt is not None else "from scratch")
    # Freezing protects pretrained features; a randomly initialised encoder is never held still.
    freeze = (tuple(model.encoder_prefixes), f.freeze_encoder_steps) \
        if f.freeze_encoder_steps and ckpt is not None else None
    trainer = Trainer(cfg, model, task, out_dir, resume=resume, freeze=freeze)
    write_config(cfg, out_dir)
    result = trainer.fit()
    return FinetuneResult(**{f.name: getattr(result, f.name) for f in fields(result)}, load_report=report)
