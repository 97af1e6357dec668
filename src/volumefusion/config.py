"""Typed, validated configuration.

A :class:`Config` is a tree of dataclasses whose defaults reproduce the MIS-FM paper. It is built
from YAML files (the bundled presets of ``volumefusion/configs/`` can be named: ``-c pretrain_paper``)
and ``--set section.field=value`` overrides, and validated before any work starts: every error is
one line naming the field, the value and what is allowed.

Each field may carry ``metadata`` with ``choices`` (allowed values), ``min``/``max`` (inclusive
bounds, applied to every element of a tuple) and ``help`` (documentation, shown by
``volumefusion config --fields``).

A single value for a list field of any length (``tuple[X, ...]``) means a list of one: ``window_size: 6``
reads as ``[6]``, so files and checkpoints written before a field took a list still load.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from volumefusion import VolumeFusionError
from volumefusion.io import atomic_write_text


class ConfigError(VolumeFusionError):
    """An invalid configuration value; the message names the field."""


def setting(default, help: str, *, choices=None, min=None, max=None):  # noqa: A002 - mirrors metadata names
    """A dataclass field with the metadata :func:`build_dataclass` checks and ``--fields`` shows:
    ``help``, ``choices`` (allowed values), ``min``/``max`` (inclusive bounds); each applies to every
    element of a tuple."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_f = setting  # the short name keeps the field tables below readable


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
    overlap: float = _f(0.5, "sliding-window overlap for validation and prediction", min=0, max=0.95)
    window_batch: int = _f(4, "windows per forward pass in sliding-window inference", min=1)
    partial_load: tuple[str, ...] = _f(
        (), "pretrained tensors (names or module paths, e.g. stem.proj) allowed to start untrained when the "
        "checkpoint's do not fit; any other tensor outside the output layers that does not load is an error")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------------
# building and validation


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` to ``annotation`` (int, float, bool, str, tuples, optionals) or raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        if variable and not isinstance(value, (list, tuple, dict)):
            return (_coerce(value, args[0], name),)  # a single value is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if variable:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)} ({list(value)!r})")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")


def _check_field(f: dataclasses.Field, value: Any, name: str) -> None:
    meta = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    wrong = [v for v in values if meta.get("choices") is not None and v not in meta["choices"]]
    if wrong:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{name}: {wrong[0]!r} is not allowed; choose one of: {allowed}")
    for v in values:
        if not isinstance(v, (int, float)) or v is None:
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{name}: {value!r} is out of range; must be >= {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{name}: {value!r} is out of range; must be <= {meta['max']}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` (fields declared like this module's) from plain ``data``:
    values converted to the field types and checked against their metadata; unknown fields, wrong
    types and out-of-range values raise :class:`ConfigError` naming ``prefix.field``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{name}: unknown field; allowed: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value or {}, name)
        else:
            kwargs[key] = _coerce(value, hint, name)
            _check_field(fields[key], kwargs[key], name)
    return cls(**kwargs)


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
        if len(m.feature_channels) != 5:
            raise ConfigError(f"model.feature_channels: PCT-Net needs 5 levels, got {list(m.feature_channels)}")
        if len(m.depths) != 3 or len(m.num_heads) != 3:
            raise ConfigError("model.depths / model.num_heads: PCT-Net needs 3 values each")
        for key in ("window_size", "shifted_windows"):
            values = getattr(m, key)
            if len(values) not in (1, 3):
                raise ConfigError(f"model.{key}: {list(values)} has {len(values)} values; PCT-Net needs one "
                                  "(every level) or 3 (levels 1/4, 1/8, 1/16)")
        for c, h in zip(m.feature_channels[2:], m.num_heads):
            if c % h:
                raise ConfigError(f"model.num_heads: {h} heads do not divide {c} channels")
    if m.name == "nnunet":
        if not m.plans:
            raise ConfigError("model.plans: model.name nnunet builds the network of an nnU-Net plans file; set "
                              "model.plans=PATH (e.g. $nnUNet_preprocessed/Dataset001_X/nnUNetPlans.json)")
        plans_configuration(m.plans, m.configuration)
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
    if len(set(ft.mirror_axes)) != len(ft.mirror_axes):
        raise ConfigError(f"finetune.mirror_axes: {list(ft.mirror_axes)} names an axis twice")
    return cfg


def describe_json(value: Any) -> str:
    """A value read from JSON as an error message names it: ``'a list'``, ``'a string "8x8x8"'``."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if not isinstance(value, (dict, list)) else ""
    return f"{kind} {text[:40]}".strip()


def plans_configuration(path: str | Path, name: str) -> dict[str, Any]:
    """Configuration ``name`` of the nnU-Net plans file ``path`` as a dict, with the entries it
    inherits (``inherits_from``) filled in; errors name ``model.plans`` / ``model.configuration``,
    the file and what in it is wrong.

    Only the JSON is read (no nnU-Net import): ``patch_size`` (z, y, x voxels of nnU-Net's
    preprocessed arrays), ``spacing``, ``architecture`` (``network_class_name``, ``arch_kwargs``).
    """
    try:
        plans = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.plans: {path} is not a readable nnU-Net plans file ({exc})") from None
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(plans, dict):
        found = f"the file holds {describe_json(plans)}"
    elif not isinstance(configurations, dict):
        found = f"'configurations' is {describe_json(configurations)}"
    else:
        found = next((f"configuration {key!r} is {describe_json(value)}" for key, value in configurations.items()
                      if not isinstance(value, dict)), None)
    if found:
        raise ConfigError(f"model.plans: {path} is not an nnU-Net v2 plans file ({found}; expected an object with "
                          "'configurations': {name: {settings}})")
    if name not in configurations:
        raise ConfigError(f"model.configuration: {name!r} is not in {path}; it has: {', '.join(configurations)}")
    merged: dict[str, Any] = {}
    chain = [name]
    while True:  # the parent first, so the child's entries win
        merged = {**configurations[chain[-1]], **merged}
        parent = configurations[chain[-1]].get("inherits_from")
        if parent is None:
            break
        if parent not in configurations:
            raise ConfigError(f"model.configuration: {chain[-1]!r} of {path} inherits_from {parent!r}, which is not "
                              f"in the file; it has: {', '.join(configurations)}")
        if parent in chain:
            raise ConfigError(f"model.configuration: {name!r} of {path} inherits from itself "
                              f"({' -> '.join(chain + [parent])})")
        chain.append(parent)
    merged.pop("inherits_from", None)
    patch, arch = merged.get("patch_size"), merged.get("architecture")
    if patch is None or (isinstance(patch, list) and len(patch) != 3) or not isinstance(arch, dict):
        raise ConfigError(f"model.configuration: {name!r} of {path} is not a 3D configuration with an "
                          "architecture (nnU-Net v2 plans); choose a 3d one such as 3d_fullres")
    if not (isinstance(patch, list) and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise ConfigError(f"model.configuration: {name!r} of {path}: patch_size {json.dumps(patch)} is not three "
                          "positive whole numbers of voxels")
    spacing = merged.get("spacing", [1, 1, 1])
    if not (isinstance(spacing, list) and len(spacing) == 3
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing)):
        raise ConfigError(f"model.configuration: {name!r} of {path}: spacing {json.dumps(spacing)} is not three "
                          "positive millimetre values")
    if not isinstance(arch.get("network_class_name"), str) or not isinstance(arch.get("arch_kwargs"), dict):
        raise ConfigError(f"model.configuration: {name!r} of {path}: its architecture needs 'network_class_name' "
                          "(a dotted class path) and 'arch_kwargs' (an object); plan the dataset with nnU-Net v2")
    return merged


def to_dict(obj: Any) -> Any:
    """Plain nested dicts and lists, suitable for YAML/JSON and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, nested mappings merged key by key (neither is changed)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``'optim.lr=3e-4'`` -> ``{'optim': {'lr': 0.0003}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    if isinstance(value, str):
        # YAML reads 3e-4 as a string (no dot); accept the usual float spellings.
        try:
            value = float(value)
        except ValueError:
            pass
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def from_dict(data: dict[str, Any]) -> Config:
    return validate(build_dataclass(Config, data, ""))


PRESETS = Path(__file__).parent / "configs"
"""The presets shipped with the package: pretrain_paper, finetune, demo."""
DEMO_PRESET = PRESETS / "demo.yaml"
"""Not a run config: the settings of ``volumefusion demo``, which holds a run config per stage."""


def presets() -> list[str]:
    """Names of the bundled presets (usable as ``-c NAME``)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_path(path: str | Path) -> Path:
    """A config file: ``path`` itself when it exists, else the bundled preset of that name
    (``pretrain_paper``, ``pretrain_paper.yaml`` or ``configs/pretrain_paper.yaml`` all name it)."""
    path = Path(path)
    if path.is_file():
        return path
    preset = PRESETS / f"{path.name.removesuffix('.yaml')}.yaml"
    if preset.is_file() and path.parent.name in ("", "configs"):
        return preset
    raise ConfigError(f"config file {path} does not exist (bundled presets: {', '.join(presets())})")


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
        if path == DEMO_PRESET:
            raise ConfigError(f"{path.name} holds the settings of `volumefusion demo` (phantoms, seeds, stages), "
                              "not of a run; use it with `volumefusion demo -c`, or give -c pretrain_paper / finetune")
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        data = merge(data, content)
    for text in overrides or []:
        data = merge(data, parse_override(text))
    cfg = from_dict(merge(to_dict(Config()), data))
    if cfg.model.name == "nnunet" and "crop_size" not in (data.get("data") or {}):
        cfg.data.crop_size = tuple(plans_configuration(cfg.model.plans, cfg.model.configuration)["patch_size"])
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
