"""The run configuration: what every command's settings are, with defaults that reproduce the paper.

A :class:`Config` is a tree of dataclasses whose fields are declared with
:func:`~volumefusion.typed_config.setting` (type, default, allowed values, help). :func:`load` builds
one from YAML files (the bundled presets of ``volumefusion/configs/`` can be named: ``-c pretrain_paper``)
and ``--set section.field=value`` overrides, and :func:`validate` checks it and the rules between
fields before any work starts: every error is one line naming the field, the value and what is
allowed. The machinery (typed dataclasses from plain data, YAML files, presets, overrides) is
:mod:`volumefusion.typed_config`; the rules of a plans network (`model.name: nnunet`) and the
crop it implies are :mod:`volumefusion.nnunet_plans`'s.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from volumefusion.files import atomic_write_text
from volumefusion.nnunet_plans import check_plans_model, plans_crop
from volumefusion.pctnet_shape import pyramid_shape
from volumefusion.typed_config import (
    PRESETS,
    ConfigError,
    build_dataclass,
    declared_command,
    merge,
    parse_override,
    presets,
    read_yaml,
    resolve_path,
    setting,
    to_dict,
)

__all__ = [
    "PRESETS", "Config", "ConfigError", "DataConfig", "FinetuneConfig", "FusionConfig", "LossConfig", "ModelConfig",
    "OptimConfig", "ProbeConfig", "RunConfig", "build_dataclass", "changed_fields", "declared_command",
    "describe_fields", "from_dict", "is_run_config", "load", "merge", "parse_override",
    "presets", "read_yaml", "resolve_path", "save", "setting", "to_dict", "validate",
]

_f = setting  # the short name keeps the field tables below readable

MAX_OVERLAP = 0.95
"""Largest sliding-window overlap a config or ``predict --overlap`` takes."""


@dataclass
class DataConfig:
    crop_size: tuple[int, int, int] = _f((64, 128, 128), "training crop (z, y, x) in voxels", min=1)
    hu_window: tuple[float, float] = _f(
        (-1000.0, 1000.0), "HU clipped to [low, high] and mapped linearly to [-1, 1]"
    )
    pad_value: float = _f(-1024.0, "HU used to pad cases smaller than the crop")
    workers: int = _f(4, "loader worker processes per training process (0 = load in the main process)", min=0)
    prefetch: int = _f(4, "batches prefetched per worker", min=1)


@dataclass
class FusionConfig:
    mode: str = _f("boxes", "boxes: paper (random boxes); grid: PyMIC 2024 variant", choices=("boxes", "grid"))
    num_classes: int = _f(5, "K+1 fusion classes; alpha takes values in {0, 1/K, ..., 1}", min=2, max=255)
    num_boxes: tuple[int, int] = _f((10, 40), "boxes per sample, drawn uniformly in [min, max]", min=0)
    box_size_min: tuple[float, float, float] = _f(
        (8, 8, 8), "smallest box side (z, y, x): voxels, or fractions of the crop if <= 1", min=0
    )
    box_size_max: tuple[float, float, float] = _f(
        (40, 80, 80), "largest box side (z, y, x): voxels, or fractions of the crop if <= 1", min=0
    )
    views: bool = _f(False, "boxes mode: fuse augmented views of the two crops (random resized crop, flips, "
                     "contrast, gamma, joint inversion, as grid mode does) rather than the crops as they are, so "
                     "that a fused box differs from its surroundings even where two scans align")
    grid_block_min: tuple[int, int, int] = _f((5, 8, 8), "grid mode: smallest block (z, y, x)", min=1)
    grid_block_max: tuple[int, int, int] = _f((20, 32, 32), "grid mode: largest block (z, y, x)", min=1)
    grid_foreground_ratio: float = _f(0.7, "grid mode: share of blocks taken from the foreground", min=0, max=1)


@dataclass
class ModelConfig:
    name: str = _f("pctnet", "network architecture; nnunet: the network an nnU-Net plans file describes (extra "
                   "volumefusion[nnunet])", choices=("pctnet", "unet", "nnunet"))
    plans: str | None = _f(None, "nnunet: an nnU-Net plans file (nnUNetPlans.json, nnUNetResEncUNetLPlans.json); "
                           "data.crop_size defaults to its patch size")
    configuration: str = _f("3d_fullres", "nnunet: the plans' configuration to build")
    in_channels: int = _f(1, "input channels", min=1)
    feature_channels: tuple[int, ...] = _f((24, 48, 128, 256, 512), "channels per resolution level", min=1)
    dropout: tuple[float, ...] = _f((0.0, 0.0, 0.2, 0.2, 0.2), "dropout per level", min=0, max=1)
    depths: tuple[int, ...] = _f((2, 2, 2), "Swin blocks per PCT block at 1/4, 1/8, 1/16", min=1)
    num_heads: tuple[int, ...] = _f((4, 8, 16), "attention heads at 1/4, 1/8, 1/16", min=1)
    window_size: tuple[int, ...] = _f(
        (6,), "attention window side (voxels of the feature map); one value or one per level (1/4, 1/8, 1/16)",
        min=1)
    shifted_windows: tuple[bool, ...] = _f(
        (True,), "shift every second Swin block by half a window; one value or one per level (1/4, 1/8, 1/16)")
    resolution_mode: int = _f(1, "0: isotropic stem, 1: first down-sampling in-plane only, 2: first two",
                              choices=(0, 1, 2))
    drop_path: float = _f(0.2, "stochastic depth of the Swin blocks", min=0, max=1)
    rel_pos_index: str = _f(
        "exact", "relative-position index: exact (collision-free) or reference (MIS-FM weights)",
        choices=("exact", "reference"),
    )
    deep_supervision: bool = _f(True, "return outputs at full, 1/2, 1/4, 1/8 resolution (nnunet: one per "
                                "decoder stage)")
    activation_checkpointing: bool = _f(
        False, "recompute the transformer blocks and the stem/head convolutions in backward: ~4.7x less "
        "activation memory (paper net, bf16: 3.45 -> 0.73 GB/sample) for ~10% more FLOPs")


@dataclass
class LossConfig:
    dice_weight: float = _f(0.5, "weight of the soft Dice loss", min=0)
    ce_weight: float = _f(0.5, "weight of the cross-entropy loss", min=0)
    deep_supervision: bool = _f(True, "add losses on the coarse outputs, weights 1/2^i normalised")


@dataclass
class OptimConfig:
    name: str = _f("adam", "optimiser", choices=("adam", "adamw", "sgd"))
    lr: float = _f(1e-3, "peak learning rate", min=0)
    weight_decay: float = _f(1e-5, "weight decay", min=0)
    momentum: float = _f(0.99, "SGD momentum (Nesterov)", min=0, max=1)
    schedule: str = _f("step", "step: multiply by gamma every step_size steps (paper); poly; cosine",
                       choices=("step", "poly", "cosine", "constant"))
    step_size: int = _f(50000, "step schedule: steps between decays", min=1)
    gamma: float = _f(0.5, "step schedule: decay factor", min=0, max=1)
    poly_power: float = _f(0.9, "poly schedule exponent", min=0)
    warmup_steps: int = _f(0, "linear warm-up steps from 0 to lr", min=0)
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0 = off)", min=0)
    accumulate: int = _f(1, "micro-batches accumulated per optimiser step", min=1)


@dataclass
class RunConfig:
    max_steps: int = _f(400000, "optimiser steps", min=1)
    stop_after: int = _f(0, "stop after this step though the schedule spans max_steps (a run read early; "
                         "--resume goes on); 0 = at max_steps", min=0)
    batch_size: int = _f(4, "samples per process per micro-batch (global = this x processes x accumulate)",
                         min=1)
    seed: int = _f(0, "seed of every random draw", min=0)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", choices=("auto", "bf16", "fp32"))
    compile: bool = _f(False, "torch.compile the model")
    channels_last: bool = _f(False, "use the channels_last_3d memory format")
    log_every: int = _f(20, "steps between metric records", min=1)
    val_every: int = _f(1000, "steps between validations", min=1)
    val_samples: int = _f(16, "pretraining: fixed fused validation crops", min=1)
    checkpoint_every: int = _f(1000, "steps between 'latest' checkpoints", min=1)
    keep_last: int = _f(3, "numbered checkpoints kept besides latest and best (0 = none)", min=0)
    image_every: int = _f(5000, "steps between PNG montages of inputs and predictions", min=1)


@dataclass
class FinetuneConfig:
    num_folds: int = _f(5, "k of the k-fold split by case", min=2)
    fold: int = _f(0, "validation fold (0-based)", min=0)
    split_file: str | None = _f(None, "JSON file {train: [ids], val: [ids]} overriding the k-fold split")
    foreground_ratio: float = _f(0.33, "share of crops centred on a foreground voxel", min=0, max=1)
    freeze_encoder_steps: int = _f(
        0, "steps with the pretrained encoder's weights held still (learning rate 0); its BatchNorm layers "
        "still normalise by batch statistics and update their running statistics", min=0)
    mirror_axes: tuple[int, ...] = _f(
        (0, 1, 2), "axes (0 z, 1 y, 2 x) that augmentation and `predict --tta` mirror; [0, 1] keeps left and "
        "right apart (left/right organ labels)", min=0, max=2)
    overlap: float = _f(0.5, "sliding-window overlap for validation and prediction", min=0, max=MAX_OVERLAP)
    window_batch: int = _f(4, "windows per forward pass in sliding-window inference", min=1)
    partial_load: tuple[str, ...] = _f(
        (), "pretrained tensors (names or module paths, e.g. stem.proj) allowed to start untrained when the "
        "checkpoint's do not fit; any other tensor outside the output layers that does not load is an error")


@dataclass
class ProbeConfig:
    every: int = _f(0, "pretraining: probe the checkpoint every N steps (0: never): train only the decoder on "
                    "probe.data with the encoder held, beside a random encoder (volumefusion probe)", min=0)
    data: str | None = _f(None, "the probe's labelled dataset: an MSD / nnU-Net folder or a labelled store")
    split_file: str | None = _f(None, "the probe's {train: [ids], val: [ids]}; scored on val (default: fold 0 of 5)")
    labelled: int = _f(0, "training cases per probe run, drawn by its seed (0: every training case)", min=0)
    seeds: tuple[int, ...] = _f((0,), "probe runs: one per seed and arm", min=0)
    steps: int = _f(500, "decoder training steps per probe run", min=1)
    recipe: tuple[str, ...] = _f(("finetune",), "config files or presets of the probe's fine-tuning runs (lr, "
                                 "batch, augmentation); the crop and network come from the pretraining")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------------
# validation, loading, saving


def validate(cfg: Config) -> Config:
    """Check every field of ``cfg`` and the constraints between fields; return ``cfg``."""
    build_dataclass(Config, to_dict(cfg), "")
    m, fu, ft = cfg.model, cfg.fusion, cfg.finetune
    if len(m.dropout) != len(m.feature_channels):
        raise ConfigError(
            f"model.dropout: {list(m.dropout)} has {len(m.dropout)} values; "
            f"needs one per feature_channels entry ({len(m.feature_channels)})"
        )
    if m.name == "pctnet":
        pyramid_shape(m.feature_channels, m.depths, m.num_heads, m.window_size, m.shifted_windows)
    if m.name == "nnunet":
        check_plans_model(m)
    for i, (lo, hi) in enumerate(zip(fu.box_size_min, fu.box_size_max)):
        if lo > hi:
            raise ConfigError(f"fusion.box_size_min: {list(fu.box_size_min)} exceeds box_size_max on axis {i}")
    for i, (lo, hi) in enumerate(zip(fu.grid_block_min, fu.grid_block_max)):
        if lo > hi:
            raise ConfigError(f"fusion.grid_block_min: {list(fu.grid_block_min)} exceeds grid_block_max on axis {i}")
    if fu.num_boxes[0] > fu.num_boxes[1]:
        raise ConfigError(f"fusion.num_boxes: {list(fu.num_boxes)} must be [min, max] with min <= max")
    if cfg.data.hu_window[0] >= cfg.data.hu_window[1]:
        raise ConfigError(f"data.hu_window: {list(cfg.data.hu_window)} must be [low, high] with low < high")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.run.device):
        raise ConfigError(f"run.device: {cfg.run.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if ft.fold >= ft.num_folds:
        raise ConfigError(f"finetune.fold: {ft.fold} must be < finetune.num_folds ({ft.num_folds})")
    if cfg.probe.every and not cfg.probe.data:
        raise ConfigError(f"probe.data: probe.every is {cfg.probe.every}; name the labelled dataset to probe on "
                          "(probe.data=PATH), or set probe.every=0")
    if len(set(ft.mirror_axes)) != len(ft.mirror_axes):
        raise ConfigError(f"finetune.mirror_axes: {list(ft.mirror_axes)} names an axis twice")
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    return validate(build_dataclass(Config, data, ""))


def is_run_config(content: dict[str, Any]) -> bool:
    """Whether settings read from a file are a run config: every top-level key is a section of :class:`Config`."""
    return set(content) <= {f.name for f in dataclasses.fields(Config)}


def load(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None,
         base: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``base`` (e.g. a checkpoint's config), then each YAML file, then overrides.

    With ``model.name: nnunet`` and no ``data.crop_size`` given anywhere, the crop is the plans' patch size.
    """
    data: dict[str, Any] = base or {}
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths or []:
        path = resolve_path(path)
        content = read_yaml(path)
        command = None if is_run_config(content) else declared_command(path)
        if command:  # another command's settings file, which says so on its first line
            raise ConfigError(f"{path.name} holds the settings of `{command}`, not a run config: use it with "
                              f"`{command} -c`, or give a run config, e.g. -c pretrain_paper or -c finetune")
        data = merge(data, content)
    for text in overrides or []:
        data = merge(data, parse_override(text))
    cfg = from_dict(merge(to_dict(Config()), data))
    if cfg.model.name == "nnunet" and "crop_size" not in (data.get("data") or {}):
        cfg.data.crop_size = plans_crop(cfg.model)
    return validate(cfg)


def changed_fields(saved: dict[str, Any], cfg: Config, sections: tuple[str, ...] | None = None,
                   ignore: frozenset[str] = frozenset()) -> list[str]:
    """``'section.field: saved -> now'`` for each field of ``cfg`` that differs from ``saved`` (a config
    as a checkpoint stores it; fields it lacks count as their defaults), limited to ``sections`` when
    given, leaving out the ``section.field`` names in ``ignore``."""
    before = to_dict(from_dict(merge(to_dict(Config()), saved)))
    now = to_dict(cfg)
    return [f"{section}.{name}: {before[section][name]!r} -> {value!r}"
            for section in (sections or now) for name, value in now[section].items()
            if f"{section}.{name}" not in ignore and before[section][name] != value]


def save(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_fields() -> str:
    """Every field with its default and help text, for ``--help`` and docs."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(section.default_factory()):
            default = to_dict(getattr(section.default_factory(), f.name))
            extra = f" (one of: {', '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
            lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
