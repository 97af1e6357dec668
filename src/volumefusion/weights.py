"""Load weights into a network: pretrained ones, tolerantly and with a report, or a network's own, exactly.

:func:`load_pretrained` copies every tensor whose name and shape match, adapts the first convolution
to a different number of input channels, leaves shape-mismatched tensors (e.g. the class-dependent
output convolutions) at their fresh initialisation, and says what it did in a :class:`LoadReport`.
MIS-FM / PyMIC checkpoints have their tensor names mapped onto ours (:mod:`volumefusion.nets.misfm`);
the stems and heads of the other resolution modes are reported as unused.
:func:`model_from_checkpoint` builds the network a checkpoint describes and loads it exactly.
Checkpoints are read by :func:`volumefusion.checkpoint.read_checkpoint`, once per load.

Relative-position index: it is a persistent buffer of every attention module, so a state dict carries
the index its bias tables were trained with, and loading copies it. A MIS-FM checkpoint therefore
runs with the reference index whatever the model was built with; the report's ``rel_pos_index`` says
which index the model runs with after loading (store it as ``model.rel_pos_index`` in the config).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import Checkpoint, check_finite_weights, read_checkpoint
from volumefusion.config import Config
from volumefusion.log import get_logger
from volumefusion.nets import build_model
from volumefusion.nets.misfm import misfm_key
from volumefusion.nets.pctnet import WindowAttention

log = get_logger(__name__)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. Shapes are lists of ints (source, model)."""

    source: str
    layout: str  # "volumefusion", "misfm" or "state_dict"
    loaded: list[str] = field(default_factory=list)
    adapted: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    shape_skipped: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    head_prefixes: tuple[str, ...] = ()
    rel_pos_index: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        out = asdict(self)
        out["head_prefixes"] = list(self.head_prefixes)
        return out

    def format(self) -> str:
        """A short human-readable summary, grouped by module, for the command line."""
        total = len(self.loaded) + len(self.adapted)
        kind = {"misfm": "MIS-FM checkpoint", "volumefusion": "volumefusion checkpoint"}.get(self.layout,
                                                                                              "state dict")
        lines = [f"loaded {total} of {total + len(self.shape_skipped) + len(self.missing)} model tensors "
                 f"from {self.source} ({kind})"]
        if self.rel_pos_index:
            lines.append(f"  relative-position index: {self.rel_pos_index}")
        if self.loaded:
            lines.append("  loaded:        " + _summary(self.loaded))
        for key, src, dst in self.adapted:
            lines.append(f"  adapted:       {key} {src} -> {dst} (input channels {src[1]} -> {dst[1]}: "
                         "weights repeated over the new channels and rescaled)")
        heads = [s for s in self.shape_skipped if s[0].startswith(self.head_prefixes)]
        others = [s for s in self.shape_skipped if not s[0].startswith(self.head_prefixes)]
        if heads:
            lines.append("  fresh outputs: " + _summary([k for k, _, _ in heads], by_module=True)
                         + f" (class count {heads[0][1][0]} -> {heads[0][2][0]})")
        for key, src, dst in others:
            lines.append(f"  shape-skipped: {key} {src} vs model {dst}")
        if self.missing:
            lines.append("  missing (left at initialisation): " + _summary(self.missing, by_module=True))
        if self.unexpected:
            lines.append("  unexpected (ignored): " + _summary(self.unexpected, by_module=True))
        if self.unused:
            lines.append("  unused by this configuration (ignored): " + _summary(self.unused))
        return "\n".join(lines)


def _summary(keys: list[str], by_module: bool = False, limit: int = 12) -> str:
    """``stem (52), pyramid.e2 (40)``: counts per top-two-level module; or per full module path."""
    groups: dict[str, int] = defaultdict(int)
    for key in keys:
        parts = key.split(".")
        groups[".".join(parts[:-1] if by_module else parts[:2])] += 1
    items = [f"{name} ({n})" for name, n in groups.items()]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-convolution weights (out, c, ...) for ``in_channels`` inputs, exact for identical input
    channels: old channel i feeds the new channels j with i = j (mod min(c, in_channels)), shared equally
    among them (so 1 -> 3 repeats it divided by 3; 2 -> 1 sums the two)."""
    c = weight.shape[1]
    m = min(c, in_channels)
    linked = (torch.arange(c)[:, None] % m == torch.arange(in_channels)[None] % m).to(weight)
    return torch.einsum("oi...,ij->oj...", weight, linked / linked.sum(1, keepdim=True))


def state_dict_differences(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Why ``state`` cannot be loaded exactly into a model with ``model_state``: one phrase per tensor,
    ``"stem.proj.weight: [8, 1, 3, 3, 3] in the checkpoint vs [4, 1, 3, 3, 3] in the network"``,
    ``"... missing"``, ``"... not in the network"``; empty when it fits."""
    out = [f"{k}: {list(v.shape)} in the checkpoint vs {list(model_state[k].shape)} in the network"
           for k, v in state.items() if k in model_state and v.shape != model_state[k].shape]
    out += [f"{k}: missing from the checkpoint" for k in model_state if k not in state]
    out += [f"{k}: not in the network" for k in state if k not in model_state]
    return out


def load_exactly(model: nn.Module, state: dict[str, torch.Tensor], name: str | Path) -> None:
    """``model.load_state_dict(state)``, strict; a mismatch is a VolumeFusionError naming the file
    ``name`` and the first tensors that differ, with their shapes (:func:`state_dict_differences`), and
    so are non-finite weights (:func:`~volumefusion.checkpoint.check_finite_weights`)."""
    check_finite_weights(state, name)
    differences = state_dict_differences(model.state_dict(), state)
    if differences:
        more = f"; ... {len(differences) - 3} more" if len(differences) > 3 else ""
        raise VolumeFusionError(f"{name}: the weights do not fit the network its config describes "
                                f"({len(differences)} tensors): {'; '.join(differences[:3])}{more}")
    model.load_state_dict(state)


def _named_by(key: str, names: Sequence[str]) -> bool:
    """Whether ``key`` is one of ``names`` or lies under one of them as a module path."""
    return any(key == n or key.startswith(n.rstrip(".") + ".") for n in names)


def load_pretrained(model: nn.Module, source: str | Path | dict | Checkpoint, partial: Sequence[str] | None = (),
                    name: str | None = None) -> LoadReport:
    """Copy matching tensors of ``source`` into ``model``: anything :func:`~volumefusion.checkpoint.read_checkpoint`
    takes (a checkpoint file, ``builtin:NAME``, a loaded dict, or a :class:`~volumefusion.checkpoint.Checkpoint`
    already read, which is not read again).

    Every model tensor outside ``model.head_prefixes`` (the class-dependent output convolutions) must
    load, an adapted first convolution included, unless it is named in ``partial``: tensor names or
    module paths (``"stem.proj"``) the caller accepts at their fresh initialisation. ``partial=None``
    accepts any partial load (the report still lists what was left out). ``name``: the file a loaded
    dict came from, for messages and the report. Raises :class:`VolumeFusionError` naming the file for
    corrupt, foreign or mismatched checkpoints and for non-finite weights (a diverged run's).
    """
    ckpt = read_checkpoint(source)
    state, layout, name = ckpt.state, ckpt.layout, name or ckpt.source
    head_prefixes = tuple(getattr(model, "head_prefixes", ()))
    report = LoadReport(source=name, layout=layout, head_prefixes=head_prefixes)
    target = model.state_dict()
    first_conv = next((k for k, v in target.items() if v.dim() == 5), None)
    seen = set()
    with torch.no_grad():
        for src_key, value in state.items():
            key = src_key
            if layout == "misfm":
                key = misfm_key(src_key, getattr(model, "resolution_mode", 1))
                if key is None:
                    report.unused.append(src_key)
                    continue
            if key not in target:
                report.unexpected.append(src_key)
                continue
            seen.add(key)
            dst = target[key]
            if dst.shape == value.shape:
                dst.copy_(value)
                report.loaded.append(key)
            elif key == first_conv and dst.shape[:1] + dst.shape[2:] == value.shape[:1] + value.shape[2:]:
                dst.copy_(adapt_input_conv(value.to(dst.dtype), dst.shape[1]))
                report.adapted.append((key, list(value.shape), list(dst.shape)))
            else:
                report.shape_skipped.append((key, list(value.shape), list(dst.shape)))
    report.missing = [k for k in target if k not in seen]
    if not report.loaded:
        raise VolumeFusionError(
            f"{name}: none of its {len(state)} tensors fit this {type(model).__name__} (another architecture "
            "or configuration?); first keys: " + ", ".join(list(state)[:3]))
    if partial is not None:
        _check_complete(report, list(target), partial)
    _check_indices(model, name)
    if hasattr(model, "rel_pos_index"):
        report.rel_pos_index = model.rel_pos_index
    log.debug("%s", report.format())
    return report


def _check_complete(report: LoadReport, model_keys: list[str], partial: Sequence[str]) -> None:
    """VolumeFusionError listing the tensors outside the output layers that did not load and are not
    named in ``partial``; also for a name in ``partial`` that matches no tensor of the model (a typo)."""
    unknown = [n for n in partial if not any(_named_by(k, [n]) for k in model_keys)]
    if unknown:
        raise VolumeFusionError(f"finetune.partial_load: {', '.join(unknown)} names no tensor of the model "
                                f"(its tensors are named like {model_keys[0]})")
    left = [(k, f"{src} in the checkpoint vs {dst} in the model") for k, src, dst in report.shape_skipped]
    left += [(k, "not in the checkpoint") for k in report.missing]
    left = [(k, why) for k, why in left if not k.startswith(report.head_prefixes) and not _named_by(k, partial)]
    if left:
        shown = "; ".join(f"{k}: {why}" for k, why in left[:4]) + (f"; ... {len(left) - 4} more" if len(left) > 4
                                                                 else "")
        modules = sorted({k.rsplit(".", 1)[0] for k, _ in left})
        if len(modules) > 3:  # name the top-level blocks instead of a long list of layers
            modules = sorted({".".join(k.split(".")[:2]) for k in modules})
        raise VolumeFusionError(
            f"{report.source}: {len(left)} pretrained tensor(s) outside the output layers cannot be loaded "
            f"({shown}); they would start untrained. Use a checkpoint of this architecture, or accept them "
            f"fresh by name: --partial-load {' '.join(modules)} (finetune.partial_load)")


def _check_indices(model: nn.Module, name: str) -> None:
    """Loaded relative-position indices must address rows of their bias tables."""
    for module_name, module in model.named_modules():
        if isinstance(module, WindowAttention):
            index, rows = module.relative_position_index, module.relative_position_bias_table.shape[0]
            if index.is_meta:  # a shape-only check (finetune's early one) has no values to check
                continue
            if index.min() < 0 or index.max() >= rows:
                raise VolumeFusionError(f"{name}: {module_name}.relative_position_index points outside its "
                                        f"bias table ({rows} rows); the checkpoint is corrupt")


# --------------------------------------------------------------------------------------------------
# a checkpoint's own network


def model_from_misfm(ckpt: str | Path | dict | Checkpoint, overrides: list[str] | None = None,
                     resolution_mode: int | None = None, *, name: str | None = None,
                     partial: Sequence[str] | None = ()) -> tuple[nn.Module, Config, int, LoadReport]:
    """The network of an official MIS-FM / PyMIC checkpoint (``{"model_state_dict": ...}``; anything
    :func:`~volumefusion.checkpoint.read_checkpoint` takes), built from the architecture its weights show
    and loaded: ``(model, config, num_classes, load report)``.

    ``overrides`` (``model.FIELD=VALUE``) and ``resolution_mode`` set what the weights cannot show;
    ``config.model.rel_pos_index`` is the relative-position index the weights were trained with.
    ``name``: the file a loaded dict came from, for messages; ``partial``: as in :func:`load_pretrained`
    (None: the caller checks the report).
    """
    ckpt = read_checkpoint(ckpt)
    name = name or ckpt.source
    if ckpt.layout != "misfm":
        raise VolumeFusionError(f"{name}: not a MIS-FM PCT-Net state dict ({ckpt.kind})")
    model_cfg = dict(ckpt.config["model"])
    if resolution_mode is not None:
        model_cfg["resolution_mode"] = resolution_mode
    cfg = config.load(overrides=overrides, base={"model": model_cfg})
    model = build_model(cfg.model, ckpt.num_classes)
    report = load_pretrained(model, ckpt, partial, name=name)
    cfg.model.rel_pos_index = report.rel_pos_index
    return model, cfg, ckpt.num_classes, report


def model_from_checkpoint(ckpt: str | Path | dict | Checkpoint) -> tuple[nn.Module, Config, int]:
    """``(network, config, num_classes)`` of a checkpoint that describes its network: ours (``.pt`` or a
    safetensors export), loaded exactly (:func:`load_exactly`), or an official MIS-FM one, whose
    architecture is read from its weights (:func:`model_from_misfm`). The network is in training mode,
    on the CPU."""
    ckpt = read_checkpoint(ckpt)
    if ckpt.layout == "misfm":
        model, cfg, num_classes, _ = model_from_misfm(ckpt)
        return model, cfg, num_classes
    if ckpt.file_format == "safetensors" and not ckpt.config:
        raise ckpt.error("no volumefusion config in its metadata; export it with `volumefusion convert --safetensors`")
    ckpt.require("expected keys 'model', 'config' and 'task' (with num_classes), or 'model_state_dict'",
                 "config", "num_classes")
    cfg = ckpt.run_config()
    model = build_model(cfg.model, ckpt.num_classes)
    load_exactly(model, ckpt.state, ckpt.source)
    return model, cfg, ckpt.num_classes
