"""Export a volumefusion checkpoint for fine-tuning in nnU-Net v2.

Writes, into one folder:
- ``volumefusion_<configuration>.pth``: ``{"network_weights": state_dict}``, the form nnU-Net's
  ``-pretrained_weights`` loads (every key but the segmentation layers' must be in it, same shape);
- ``<plans_name>_volumefusion.json``: a plans variant holding one new configuration per export
  (``3d_fullres_pctnet`` for PCT-Net, ``3d_fullres_volumefusion`` for a network of the plans itself)
  whose architecture, patch size and pooling are the network's and whose CT normalisation is the
  pretraining's HU window. A later export into the same folder adds its configuration to the file.

The normalisation: nnU-Net's ``CTNormalization`` clips to the plans' ``percentile_00_5`` and
``percentile_99_5`` of the channel and then computes ``(x - mean) / std``. With the window
``[low, high]`` as the percentiles, ``mean = (low + high) / 2`` and ``std = (high - low) / 2`` it is
exactly :func:`volumefusion.preprocess.normalise_hu`: HU clipped to the window, mapped to [-1, 1].
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from volumefusion import VolumeFusionError
from volumefusion.checkpoint import Checkpoint, read_checkpoint
from volumefusion.config import ConfigError, ModelConfig, from_dict
from volumefusion.files import atomic_write_bytes, atomic_write_text
from volumefusion.nets.nnunet import PCTNetForNNUNet, build_plans_network, pctnet_strides
from volumefusion.nnunet_plans import plans_configuration

SEG_KEY = ".seg_layers."  # nnU-Net's load_pretrained_weights skips the keys that contain it
PCTNET_CLASS = "volumefusion.integrations.nnunet.PCTNetForNNUNet"  # the dotted path nnU-Net locates


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
    try:
        base = plans_configuration(plans, configuration)
    except ConfigError as exc:
        raise VolumeFusionError(str(exc).replace("model.plans", "--plans")
                                .replace("model.configuration", "--configuration")) from None
    return json.loads(plans.read_text()), base


def _check_ct_plans(plans: dict, base: dict, path: Path, configuration: str) -> None:
    channels = plans.get("foreground_intensity_properties_per_channel", {})
    if len(channels) != 1:
        raise VolumeFusionError(f"{path}: the dataset has {len(channels)} input channels; Volume Fusion weights "
                                "take one CT channel: plan a dataset whose dataset.json has channel_names "
                                "{\"0\": \"CT\"}")
    schemes = base.get("normalization_schemes", [])
    if schemes != ["CTNormalization"]:
        raise VolumeFusionError(f"{path}: configuration {configuration} normalises its channel with {schemes}, not "
                                "as CT; set channel_names {\"0\": \"CT\"} in dataset.json and plan again")


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
                           configuration: str):
    """(architecture, patch size, weights) of a checkpoint of a network built from a plans file."""
    model = ModelConfig(name="nnunet", plans=str(plans), configuration=configuration,
                        in_channels=cfg.model.in_channels)
    with torch.device("meta"):
        network = build_plans_network(model, num_classes)
    problems = misfit(network.state_dict(), state)
    if problems:
        raise VolumeFusionError(
            f"the checkpoint's network (pretrained from {cfg.model.plans}, configuration {cfg.model.configuration}) "
            f"does not fit configuration {configuration} of {plans} ({len(problems)} tensors, e.g. "
            f"{'; '.join(problems[:3])}); export with the plans file and configuration it was pretrained with")
    return copy.deepcopy(base["architecture"]), list(base["patch_size"]), state


def export_nnunet(checkpoint: str | Path | Checkpoint, plans: str | Path, out_dir: str | Path,
                  configuration: str = "3d_fullres") -> ExportResult:
    """Write nnU-Net pretrained weights and a plans variant for ``checkpoint`` (a file, ``builtin:NAME``, or
    a :class:`~volumefusion.checkpoint.Checkpoint`; see the module docstring).

    ``plans``: the dataset's plans file (e.g. ``$nnUNet_preprocessed/Dataset501_Organs/nnUNetPlans.json``);
    ``configuration``: the one to start from (its spacing, batch size and, for a network of the plans
    itself, its architecture). Refuses checkpoints the plans cannot hold, saying what to change.
    """
    plans, out_dir = Path(plans), Path(out_dir)
    ckpt = read_checkpoint(checkpoint)
    if ckpt.layout == "misfm":
        raise ckpt.error("an official MIS-FM checkpoint; turn it into a volumefusion one first: volumefusion "
                         "convert MISFM.pt --out OURS.pt")
    ckpt.require("export nnunet takes a checkpoint of volumefusion pretraining", "config")
    saved = copy.deepcopy(ckpt.config)
    if saved.get("model", {}).get("name") == "nnunet":
        saved["model"]["plans"] = str(plans)  # the recorded path need not exist here; --plans is checked below
    try:
        cfg = from_dict(saved)
    except ConfigError as exc:
        raise ckpt.error(f"its config is not valid: {exc}") from None
    state = ckpt.state
    num_classes = ckpt.num_classes or cfg.fusion.num_classes
    plans_dict, base = _read_plans(plans, configuration)
    _check_ct_plans(plans_dict, base, plans, configuration)
    if cfg.model.in_channels != 1:
        raise ckpt.error(f"the network takes {cfg.model.in_channels} input channels; nnU-Net gives it one CT "
                         "channel: pretrain with model.in_channels=1")
    if cfg.model.name == "pctnet":
        architecture, patch, weights = _pctnet_variant(cfg, state, num_classes, base)
        name = f"{configuration}_pctnet"
    elif cfg.model.name == "nnunet":
        architecture, patch, weights = _plans_network_variant(cfg, state, num_classes, base, plans, configuration)
        name = f"{configuration}_volumefusion"
    else:
        raise ckpt.error(f"model.name {cfg.model.name!r} has no nnU-Net counterpart; pretrain with model.name "
                         "pctnet, or nnunet with model.plans set to the dataset's plans")

    plans_name = f"{plans_dict.get('plans_name', plans.stem)}_volumefusion"
    intensity = {"0": {**plans_dict["foreground_intensity_properties_per_channel"]["0"],
                       **ct_intensity_properties(cfg.data.hu_window)}}
    target = out_dir / f"{plans_name}.json"
    if target.is_file():
        variant = json.loads(target.read_text())
        if variant.get("foreground_intensity_properties_per_channel") != intensity:
            raise VolumeFusionError(f"{target} already holds a configuration normalised with another HU window; "
                                    "export into another --out folder")
    else:
        variant = {**copy.deepcopy(plans_dict), "plans_name": plans_name, "configurations": {},
                   "foreground_intensity_properties_per_channel": intensity}
    conf = {**copy.deepcopy(base), "architecture": architecture, "patch_size": patch,
            "data_identifier": f"{plans_name}_{name}", "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False]}
    variant["configurations"][name] = conf

    notes = [f"HU window {list(cfg.data.hu_window)} -> [-1, 1] as in pretraining (intensity properties of the "
             "plans variant)"]
    if patch != list(base["patch_size"]):
        notes.append(f"patch size {list(base['patch_size'])} -> {patch} (multiples of the network's down-sampling)")
    spacing = ckpt.preprocessing.get("spacing_zyx")
    if spacing and sorted(spacing) != sorted(base.get("spacing", [])):
        notes.append(f"pretraining spacing {list(spacing)} mm differs from the plans' {base.get('spacing')} mm "
                     "(nnU-Net resamples to the plans' spacing)")

    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"network_weights": {k: v.contiguous() for k, v in weights.items()}}, buffer)
    weights_path = out_dir / f"volumefusion_{name}.pth"
    atomic_write_bytes(weights_path, buffer.getvalue())
    atomic_write_text(target, json.dumps(variant, indent=4, sort_keys=False))
    return ExportResult(weights_path, target, plans_name, name, notes)
