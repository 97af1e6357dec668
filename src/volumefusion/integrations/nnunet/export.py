"""Export a volumefusion checkpoint for fine-tuning in nnU-Net v2.

Writes, into one folder (the dataset's in ``nnUNet_preprocessed``, where nnU-Net looks for plans):
- ``<plans_name>_volumefusion.json``: a plans variant holding one new configuration per export
  (``3d_fullres_pctnet`` for PCT-Net, ``3d_fullres_volumefusion`` for a network of the plans itself)
  whose architecture, patch size and pooling are the network's and whose CT normalisation is the
  pretraining's HU window. A later export into the same folder adds its configuration to the file;
  one that would replace a configuration (or its weights) is refused unless ``force``, which keeps the
  configuration's hand-edited ``batch_size``. One plans variant has one CT normalisation: a checkpoint
  of another HU window goes into another variant (``plans_name``);
- ``<variant>_<configuration>.pth`` (e.g. ``nnUNetPlans_volumefusion_3d_fullres_pctnet.pth``):
  ``{"network_weights": state_dict}``, the form nnU-Net's ``-pretrained_weights`` loads (every key but
  the segmentation layers' must be in it, same shape).

Both files are written to temporaries first and renamed into place together, so a failed export
leaves the folder as it was.

The normalisation: nnU-Net's ``CTNormalization`` clips to the plans' ``percentile_00_5`` and
``percentile_99_5`` of the channel and then computes ``(x - mean) / std``. With the window
``[low, high]`` as the percentiles, ``mean = (low + high) / 2`` and ``std = (high - low) / 2`` it is
exactly :func:`volumefusion.preprocess.normalise_hu`: HU clipped to the window, mapped to [-1, 1].
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from volumefusion import VolumeFusionError
from volumefusion.checkpoint import Checkpoint, read_checkpoint
from volumefusion.config import ConfigError, ModelConfig, from_dict
from volumefusion.files import atomic_path, check_writable_folder, resolved
from volumefusion.nets.nnunet import PCTNetForNNUNet, build_plans_network, pctnet_strides
from volumefusion.nnunet_plans import describe_json, plans_configuration

SEG_KEY = ".seg_layers."  # nnU-Net's load_pretrained_weights skips the keys that contain it
PCTNET_CLASS = "volumefusion.integrations.nnunet.PCTNetForNNUNet"  # the dotted path nnU-Net locates
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # nnU-Net puts plans and configuration names in file names
KEPT = ("batch_size",)  # the settings of an existing configuration that a forced re-export keeps


@dataclass
class ExportResult:
    """What :func:`export_nnunet` wrote: the weights, the plans variant (``-p plans_name``) and the
    configuration to train (``nnUNetv2_train DATASET configuration FOLD``); ``notes`` are differences
    between pretraining and the plans that the user should know about."""

    weights: Path
    plans: Path
    plans_name: str
    configuration: str
    notes: list[str] = field(default_factory=list)


def ct_intensity_properties(hu_window: tuple[float, float]) -> dict[str, float]:
    """Plans intensity properties under which nnU-Net's CTNormalization maps HU exactly as pretraining did
    (clip to ``hu_window``, map linearly to [-1, 1])."""
    low, high = (float(v) for v in hu_window)
    return {"mean": (low + high) / 2, "std": (high - low) / 2, "percentile_00_5": low, "percentile_99_5": high,
            "min": low, "max": high, "median": (low + high) / 2}


def misfit(network_state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> list[str]:
    """The network's non-segmentation tensors that ``weights`` lacks or holds with another shape."""
    problems = []
    for key, value in network_state.items():
        if SEG_KEY in key:
            continue
        if key not in weights:
            problems.append(f"{key} missing")
        elif tuple(weights[key].shape) != tuple(value.shape):
            problems.append(f"{key} {list(weights[key].shape)} vs {list(value.shape)}")
    return problems


def _read_plans(plans: Path, configuration: str) -> tuple[dict, dict]:
    """(the plans file, configuration ``configuration`` with what it inherits), checked for what the export
    reads; a VolumeFusionError names the file and the problem."""
    try:
        base = plans_configuration(plans, configuration)
    except ConfigError as exc:
        raise VolumeFusionError(str(exc).replace("model.plans: ", "--plans ")
                                .replace("model.configuration: ", "--configuration ")) from None
    plans_dict = json.loads(plans.read_text())
    channels = plans_dict.get("foreground_intensity_properties_per_channel")
    if not isinstance(channels, dict) or not all(isinstance(v, dict) for v in channels.values()):
        raise VolumeFusionError(f"{plans}: foreground_intensity_properties_per_channel is {describe_json(channels)}, "
                                "not an object per input channel; plan the dataset with nnU-Net v2")
    if len(channels) != 1:
        raise VolumeFusionError(f"{plans}: the dataset has {len(channels)} input channels; Volume Fusion weights "
                                "take one CT channel: plan a dataset whose dataset.json has channel_names "
                                "{\"0\": \"CT\"}")
    if "0" not in channels:
        raise VolumeFusionError(f"{plans}: the intensity properties of its one channel are under "
                                f"{next(iter(channels))!r}, not \"0\"; plan the dataset with nnU-Net v2")
    schemes = base.get("normalization_schemes", [])
    if schemes != ["CTNormalization"]:
        raise VolumeFusionError(f"{plans}: configuration {configuration} normalises its channel with {schemes}, not "
                                "as CT; set channel_names {\"0\": \"CT\"} in dataset.json and plan again")
    return plans_dict, base


def _variant_problem(variant) -> str | None:
    """What in a plans variant read from JSON the export cannot use, or None."""
    if not isinstance(variant, dict):
        return f"the file holds {describe_json(variant)}"
    for key in ("configurations", "foreground_intensity_properties_per_channel"):
        if not isinstance(variant.get(key), dict):
            return f"{key!r} is {describe_json(variant.get(key))}"
    return next((f"configuration {key!r} is {describe_json(value)}"
                 for key, value in variant["configurations"].items() if not isinstance(value, dict)), None)


def _read_variant(target: Path) -> dict | None:
    """The plans variant an earlier export wrote at ``target`` (None if there is none), checked."""
    if not target.exists():
        return None
    try:
        variant = json.loads(target.read_text())
        problem = _variant_problem(variant)
    except (OSError, ValueError) as exc:
        problem = str(exc)
    if problem:
        raise VolumeFusionError(f"{target}: the plans variant of an earlier export cannot be read ({problem}); "
                                "repair or remove it, or export into another variant with --plans-name NAME")
    return variant


def _window(intensity: dict) -> list:
    properties = intensity.get("0") if isinstance(intensity.get("0"), dict) else {}
    return [properties.get("percentile_00_5"), properties.get("percentile_99_5")]


def _check_name(value: str, option: str) -> str:
    if not NAME.fullmatch(value) or "__" in value:
        raise VolumeFusionError(f"{option} {value!r}: nnU-Net uses it in file and folder names; use letters, digits, "
                                "'_', '-' and '.' (no '__', which nnU-Net's folder names use as a separator)")
    return value


def trainer_search_problem() -> str | None:
    """Why ``nnUNetv2_train -tr TRAINER`` with a trainer other than the default would fail in this environment,
    or None. nnU-Net looks a trainer up by importing every trainer module it ships until one defines it; the
    Primus trainers import timm, which imports torchvision, and a torchvision built for another torch (PyPI's
    CUDA build beside a CPU torch) fails on import (``operator torchvision::nms does not exist``). The default
    nnUNetTrainer is found before them, so the plain command works all the same."""
    try:
        importlib.import_module("timm")
    except ModuleNotFoundError as exc:
        if exc.name == "timm":
            return None  # no timm: no trainer of this nnU-Net needs it
        problem = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # RuntimeError or OSError from a torchvision of another build
        problem = f"{type(exc).__name__}: {exc}"
    else:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        torchvision = f"torchvision {version('torchvision')}"
    except PackageNotFoundError:
        torchvision = "no torchvision"
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    index = (" --index-url https://download.pytorch.org/whl/cpu" if torch.version.cuda is None
             else " (from the index your torch came from)")
    install = (f"pip install torchvision==0.{minor + 15}{index}" if major == 2
               else f"install the torchvision release made for torch {torch.__version__}")
    return (f"nnUNetv2_train runs here with its default trainer only: -tr with any other trainer makes nnU-Net "
            f"import its trainers, and timm fails to import ({problem.splitlines()[0]}); {torchvision} does not match "
            f"torch {torch.__version__}: {install}")


def _pctnet_variant(cfg, state: dict[str, torch.Tensor], num_classes: int, base: dict):
    """(architecture, patch size, weights under PCTNetForNNUNet's keys) of a PCT-Net checkpoint."""
    m = cfg.model
    kwargs = {"feature_channels": list(m.feature_channels), "dropout": list(m.dropout), "depths": list(m.depths),
              "num_heads": list(m.num_heads), "window_size": list(m.window_size),
              "shifted_windows": list(m.shifted_windows), "resolution_mode": m.resolution_mode,
              "drop_path": m.drop_path, "rel_pos_index": m.rel_pos_index,
              "strides": pctnet_strides(m.resolution_mode)}
    with torch.device("meta"):
        network = PCTNetForNNUNet(m.in_channels, num_classes, True, **kwargs)
    weights = {}
    for key, value in state.items():
        for ours, theirs in network.renamed_prefixes:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        weights[key] = value
    problems = misfit(network.state_dict(), weights)
    if problems:
        raise VolumeFusionError(f"the checkpoint's weights do not fit the PCT-Net its config describes "
                                f"({len(problems)} tensors, e.g. {'; '.join(problems[:3])})")
    divisor = network.size_divisor
    patch = [max(d, p // d * d) for p, d in zip(base["patch_size"], divisor)]
    architecture = {"network_class_name": PCTNET_CLASS, "arch_kwargs": kwargs, "_kw_requires_import": []}
    return architecture, patch, weights


def _plans_network_variant(cfg, state: dict[str, torch.Tensor], num_classes: int, base: dict, plans: Path,
                           configuration: str, pretrained_plans: str | None):
    """(architecture, patch size, weights) of a checkpoint of a network built from a plans file."""
    model = ModelConfig(name="nnunet", plans=str(plans), configuration=configuration,
                        in_channels=cfg.model.in_channels)
    with torch.device("meta"):
        network = build_plans_network(model, num_classes)
    problems = misfit(network.state_dict(), state)
    if problems:
        raise VolumeFusionError(
            f"the checkpoint's network (pretrained from {pretrained_plans}, configuration {cfg.model.configuration}) "
            f"does not fit configuration {configuration} of {plans} ({len(problems)} tensors, e.g. "
            f"{'; '.join(problems[:3])}); export with the plans file and configuration it was pretrained with")
    return copy.deepcopy(base["architecture"]), list(base["patch_size"]), state


def export_nnunet(checkpoint: str | Path | Checkpoint, plans: str | Path, out_dir: str | Path,
                  configuration: str = "3d_fullres", *, plans_name: str | None = None, name: str | None = None,
                  force: bool = False) -> ExportResult:
    """Write nnU-Net pretrained weights and a plans variant for ``checkpoint`` (a file, ``builtin:NAME``, or
    a :class:`~volumefusion.checkpoint.Checkpoint`; see the module docstring).

    ``plans``: the dataset's plans file (e.g. ``$nnUNet_preprocessed/Dataset501_Organs/nnUNetPlans.json``);
    ``out_dir``: where nnU-Net finds plans, the dataset's preprocessed folder;
    ``configuration``: the one to start from (its spacing, batch size and, for a network of the plans
    itself, its architecture); ``plans_name``: the variant's name (default ``<plans name>_volumefusion``);
    ``name``: the new configuration's (default ``<configuration>_pctnet`` / ``_volumefusion``);
    ``force``: replace an earlier export of the same configuration, keeping its ``batch_size``.
    Refuses checkpoints the plans cannot hold and plans files it cannot read, saying what to change.
    """
    plans, out_dir = Path(plans), Path(out_dir)
    ckpt = read_checkpoint(checkpoint)
    if ckpt.layout == "misfm":
        raise ckpt.error("an official MIS-FM checkpoint; turn it into a volumefusion one first: volumefusion "
                         "convert MISFM.pt --out OURS.pt")
    ckpt.require("export nnunet takes a checkpoint of volumefusion pretraining", "config")
    saved = copy.deepcopy(ckpt.config)
    pretrained_plans = saved.get("model", {}).get("plans")
    if saved.get("model", {}).get("name") == "nnunet":
        saved["model"]["plans"] = str(plans)  # the recorded path need not exist here; --plans is checked below
    try:
        cfg = from_dict(saved)
    except ConfigError as exc:
        raise ckpt.error(f"its config is not a volumefusion one ({exc})") from None
    state = ckpt.state
    num_classes = ckpt.num_classes or cfg.fusion.num_classes
    plans_dict, base = _read_plans(plans, configuration)
    if cfg.model.in_channels != 1:
        raise ckpt.error(f"the network takes {cfg.model.in_channels} input channels; nnU-Net gives it one CT "
                         "channel: pretrain with model.in_channels=1")
    if cfg.model.name == "pctnet":
        architecture, patch, weights = _pctnet_variant(cfg, state, num_classes, base)
        name = _check_name(name or f"{configuration}_pctnet", "--name")
    elif cfg.model.name == "nnunet":
        architecture, patch, weights = _plans_network_variant(cfg, state, num_classes, base, plans, configuration,
                                                              pretrained_plans)
        name = _check_name(name or f"{configuration}_volumefusion", "--name")
    else:
        raise ckpt.error(f"model.name {cfg.model.name!r} has no nnU-Net counterpart; pretrain with model.name "
                         "pctnet, or nnunet with model.plans set to the dataset's plans")

    base_name = plans_dict.get("plans_name") if isinstance(plans_dict.get("plans_name"), str) else plans.stem
    plans_name = _check_name(plans_name or f"{base_name}_volumefusion", "--plans-name")
    target = out_dir / f"{plans_name}.json"
    if resolved(target) == resolved(plans):
        raise VolumeFusionError(f"--plans-name {plans_name}: the variant would replace --plans {plans}; choose "
                                "another name")
    weights_path = out_dir / f"{plans_name}_{name}.pth"  # the variant's data_identifier
    intensity = {"0": {**plans_dict["foreground_intensity_properties_per_channel"]["0"],
                       **ct_intensity_properties(cfg.data.hu_window)}}
    variant = _read_variant(target)
    if variant is None:
        variant = {**copy.deepcopy(plans_dict), "plans_name": plans_name, "configurations": {},
                   "foreground_intensity_properties_per_channel": intensity}
    elif variant["foreground_intensity_properties_per_channel"] != intensity:
        low, high = cfg.data.hu_window
        raise VolumeFusionError(
            f"{target}: holds {', '.join(variant['configurations']) or 'configurations'} normalised with HU window "
            f"{_window(variant['foreground_intensity_properties_per_channel'])}, and one plans variant has one CT "
            f"normalisation; this checkpoint's window is {[low, high]}: export it into a variant of its own in the "
            f"same folder, e.g. --plans-name {plans_name}_hu{low:g}to{high:g}")
    earlier = variant["configurations"].get(name)
    taken = [f for f, there in ((weights_path.name, weights_path.exists()),
                                (f"configuration {name} of {target.name}", earlier is not None)) if there]
    if taken and not force:
        raise VolumeFusionError(f"{out_dir}: holds an earlier export ({', '.join(taken)}); --force replaces it "
                                f"(keeping the configuration's {', '.join(KEPT)}), --name NAME exports beside it")
    conf = {**copy.deepcopy(base), "architecture": architecture, "patch_size": patch,
            "data_identifier": f"{plans_name}_{name}", "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False]}
    kept = {key: earlier[key] for key in KEPT if earlier and key in earlier}
    conf.update(kept)
    variant["configurations"][name] = conf

    notes = [f"HU window {list(cfg.data.hu_window)} -> [-1, 1] as in pretraining (intensity properties of the "
             "plans variant)"]
    notes += [f"kept {key} {value} of the configuration replaced" for key, value in kept.items()]
    if patch != list(base["patch_size"]):
        notes.append(f"patch size {list(base['patch_size'])} -> {patch} (multiples of the network's down-sampling)")
    spacing = ckpt.preprocessing.get("spacing_zyx")
    if spacing and sorted(spacing) != sorted(base.get("spacing", [])):
        notes.append(f"pretraining spacing {list(spacing)} mm differs from the plans' {base.get('spacing')} mm "
                     "(nnU-Net resamples to the plans' spacing)")
    problem = trainer_search_problem()
    if problem:
        notes.append(problem)

    check_writable_folder(out_dir, "--out")
    # both files to temporaries first: a failure leaves neither, an earlier export stays whole
    buffer = io.BytesIO()  # serialised first: torch.save to a full disk fails with a RuntimeError, a write with ENOSPC
    torch.save({"network_weights": {k: v.contiguous() for k, v in weights.items()}}, buffer)
    with atomic_path(weights_path) as weights_tmp, atomic_path(target) as plans_tmp:
        weights_tmp.write_bytes(buffer.getvalue())
        plans_tmp.write_text(json.dumps(variant, indent=4, sort_keys=False))
    return ExportResult(weights_path, target, plans_name, name, notes)
