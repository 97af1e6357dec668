"""Load pretrained weights into a network, from our checkpoints or the official MIS-FM ones.

:func:`load_pretrained` copies every tensor whose name and shape match, adapts the first convolution
to a different number of input channels, leaves shape-mismatched tensors (e.g. the class-dependent
output convolutions) at their fresh initialisation, and says what it did in a :class:`LoadReport`.

MIS-FM / PyMIC checkpoints (``{'model_state_dict': ...}``) store three stems (``embeddings.{0,1,2}``)
and three heads (``pred_heads.{0,1,2}``); the pair of the model's ``resolution_mode`` is mapped onto
``stem.`` / ``head.`` and the others are reported as unused. Their remaining names map onto ours by
:func:`misfm_key`.

Relative-position index: it is a persistent buffer of every attention module, so a state dict carries
the index its bias tables were trained with, and loading copies it. A MIS-FM checkpoint therefore
runs with the reference index whatever the model was built with; the report's ``rel_pos_index`` says
which index the model runs with after loading (store it as ``model.rel_pos_index`` in the config).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import check_finite_weights, clean_state_dict, load_checkpoint, save_checkpoint
from volumefusion.config import Config
from volumefusion.log import get_logger
from volumefusion.nets import build_model
from volumefusion.nets.pctnet import REL_POS_KINDS, WindowAttention, relative_position_index

log = get_logger(__name__)

BUILTIN = Path(__file__).parent / "builtin"
"""Weights shipped with the package, named ``builtin:NAME`` (``BUILTIN/NAME.pt``; docs/weights.md)."""

MISFM_PREFIXES = ("embeddings.", "pyramid_ct.", "pred_heads.")
# The reference's nn.Sequential indices -> our module names.
_CONV_BLOCK = {"0": "unit1.norm", "1": "unit1.act", "2": "unit1.conv", "3": "unit2.norm", "4": "unit2.act",
               "6": "unit2.conv"}
_PRE_ACT = {"0": "norm", "1": "act", "2": "conv"}


def misfm_key(key: str, resolution_mode: int) -> str | None:
    """Our state-dict name for a MIS-FM PCT-Net key, or None for tensors the reference stores but does
    not use with ``resolution_mode`` (the other stems and heads, the unused ``norm_layer``)."""
    m = re.match(r"(embeddings|pred_heads)\.(\d+)\.(.*)", key)
    if m:
        if int(m[2]) != resolution_mode:
            return None
        key = ("stem." if m[1] == "embeddings" else "head.") + m[3]
    elif key.startswith("pyramid_ct."):
        key = "pyramid." + key[len("pyramid_ct."):].replace("convtrans_", "", 1)
        if ".norm_layer." in key:
            return None
    key = re.sub(r"\.conv_conv\.(\d)\.", lambda g: f".{_CONV_BLOCK.get(g[1], 'conv_conv.' + g[1])}.", key)
    key = re.sub(r"\.(down\d|out_conv\d)\.conv\.([012])\.", lambda g: f".{g[1]}.{_PRE_ACT[g[2]]}.", key)
    key = re.sub(r"\.(up\d)\.up\.([012])\.", lambda g: f".{g[1]}.up.{_PRE_ACT[g[2]]}.", key)
    key = re.sub(r"\.(up\d)\.conv\.([012])\.", lambda g: f".{g[1]}.fuse.{_PRE_ACT[g[2]]}.", key)
    return key.replace(".trans.blocks.", ".swin.blocks.")


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


def _read(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict without DDP/compile prefixes, layout, display name) of a path or a loaded dict."""
    name = str(source) if isinstance(source, (str, Path)) else "the given state dict"
    ckpt = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    if not isinstance(ckpt, dict):
        raise VolumeFusionError(f"{name}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    layout = "state_dict"
    if isinstance(ckpt.get("model_state_dict"), dict):
        state = ckpt["model_state_dict"]
    elif isinstance(ckpt.get("model"), dict):
        state, layout = ckpt["model"], "volumefusion"
    elif isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    else:
        state = ckpt
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(list(map(str, ckpt))[:6])
        raise VolumeFusionError(
            f"{name}: no model weights found (top-level keys: {keys}); expected a volumefusion checkpoint, "
            "a MIS-FM/PyMIC checkpoint ({'model_state_dict': ...}) or a plain state dict")
    state = clean_state_dict(state)
    if any(k.startswith(MISFM_PREFIXES) for k in state):
        layout = "misfm"
    return state, layout, name


def builtin_weights() -> list[str]:
    """Names of the weights shipped with the package (usable as ``builtin:NAME``)."""
    return sorted(p.stem for p in BUILTIN.glob("*.pt"))


def resolve_weights(source: str | Path) -> Path:
    """The checkpoint file ``source`` names: ``builtin:NAME`` is a checkpoint shipped with the package
    (:func:`builtin_weights`), anything else a path. Raises :class:`VolumeFusionError` when it does
    not exist."""
    text = str(source)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        path = BUILTIN / f"{name}.pt"
        if not path.is_file():
            raise VolumeFusionError(f"{text}: no such built-in weights; available: "
                                    f"{', '.join('builtin:' + n for n in builtin_weights()) or 'none'}")
        return path
    path = Path(source)
    if not path.is_file():
        raise VolumeFusionError(f"{path}: checkpoint file not found")
    return path


def export_weights(checkpoint: str | Path, out: str | Path, card: dict[str, Any] | None = None,
                   dtype: torch.dtype = torch.float16) -> Path:
    """A small weights file from a training checkpoint: model (floating tensors stored as ``dtype``;
    loading copies them into the network's float32 parameters), config, task and step, plus ``card``
    (what the weights are: data, command, pretext scores; shown by the demo report). Optimiser, RNG
    and resume state are left out. Returns ``out``."""
    ckpt = load_checkpoint(checkpoint)
    missing = [k for k in ("model", "config", "task") if k not in ckpt]
    if missing:
        raise VolumeFusionError(f"{checkpoint}: not a volumefusion training checkpoint (no {', '.join(missing)})")
    check_finite_weights(ckpt["model"], checkpoint)
    model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clean_state_dict(ckpt["model"]).items()}
    save_checkpoint(out, {"model": model, "config": ckpt["config"], "task": ckpt["task"],
                          "step": ckpt.get("step"), "card": dict(card or {})})
    return Path(out)


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


def load_pretrained(model: nn.Module, source: str | Path | dict, partial: Sequence[str] | None = (),
                    name: str | None = None) -> LoadReport:
    """Copy matching tensors of ``source`` (a checkpoint path or an already loaded dict) into ``model``.

    Every model tensor outside ``model.head_prefixes`` (the class-dependent output convolutions) must
    load, an adapted first convolution included, unless it is named in ``partial``: tensor names or
    module paths (``"stem.proj"``) the caller accepts at their fresh initialisation. ``partial=None``
    accepts any partial load (the report still lists what was left out). ``name``: the file a loaded
    dict came from, for messages and the report. Raises :class:`VolumeFusionError` naming the file for
    corrupt, foreign or mismatched checkpoints and for non-finite weights (a diverged run's).
    """
    state, layout, read_name = _read(source)
    name = name or read_name
    check_finite_weights(state, name)
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
# reading a MIS-FM checkpoint's configuration


def _shape(state: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state:
        raise VolumeFusionError(f"not a MIS-FM PCT-Net state dict: key {key!r} is missing")
    return state[key].shape


def misfm_num_classes(state: dict[str, torch.Tensor]) -> int:
    """Output classes of a MIS-FM PCT-Net state dict."""
    return _shape(clean_state_dict(state), "pred_heads.0.out_conv0.conv.2.weight")[0]


def misfm_resolution_mode(state: dict[str, torch.Tensor]) -> int | None:
    """The resolution mode whose stem was trained (the only one with BatchNorm batches tracked), or
    None when that cannot be told (e.g. untrained weights)."""
    tracked = [int(state.get(f"embeddings.{m}.conv0.conv_conv.0.num_batches_tracked", torch.tensor(0)))
               for m in range(3)]
    best = max(tracked)
    return tracked.index(best) if best > 0 and tracked.count(best) == 1 else None


def misfm_shifted_windows(windows: list[int]) -> list[bool]:
    """Whether each pyramid level of a MIS-FM PCT-Net shifts its windows, from its window sizes.

    The reference shrinks a level's window to the level's smallest feature side when that side is not
    larger than the configured window, and shifts only where the side is larger
    (:func:`~volumefusion.nets.pctnet.reference_windows`). The weights store the window (the size of the
    relative-position table) but not the shift, so this assumes the configured window was the same at
    every level (the reference's default ``[6, 6, 6]``): a level whose window is smaller than the model's
    largest was shrunk and is unshifted, the others are shifted.

    Limits, none of which the weights can tell: a level whose smallest side equalled its window exactly
    (1/16 of a ``[48, 96, 96]`` input with window 6) kept its window but ran unshifted; a level with the
    largest window is taken as shifted even when every level was shrunk (a 1/4 level no larger than the
    window, i.e. a tiny training input); and per-level configured windows (say ``[8, 6, 4]``) look
    shrunk. Set ``model.shifted_windows`` by hand there (``--set model.shifted_windows=[true,true,false]``).
    """
    return [w == max(windows) for w in windows]


def model_config_from_misfm(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``model`` config section (:class:`volumefusion.config.ModelConfig` fields) of a MIS-FM
    PCT-Net state dict: channels, heads, depths, windows and their shifts per level, input channels,
    resolution mode and the reference relative-position index. Windows come from the size of each
    level's relative-position table, shifts from :func:`misfm_shifted_windows`; both are one value when
    every level agrees. Dropout is not stored and keeps its default. Where the resolution mode cannot be
    told from the weights the paper's (1) is assumed, with a warning.
    """
    state = clean_state_dict(state)
    channels = [
        _shape(state, "embeddings.0.proj.weight")[0],
        _shape(state, "embeddings.0.conv1.conv_conv.2.weight")[0],
        _shape(state, "embeddings.0.down2.conv.2.weight")[0],
        _shape(state, "pyramid_ct.down3.conv.2.weight")[0],
        _shape(state, "pyramid_ct.down4.conv.2.weight")[0],
    ]
    heads, depths, windows, kinds = [], [], [], set()
    for level in ("e2", "e3", "e4"):
        prefix = f"pyramid_ct.convtrans_{level}.trans.blocks."
        table = _shape(state, prefix + "0.attn.relative_position_bias_table")
        heads.append(table[1])
        depths.append(len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}))
        side = round(table[0] ** (1 / 3))
        windows.append((side + 1) // 2)
        index = state[prefix + "0.attn.relative_position_index"]
        kinds.update(k for k in REL_POS_KINDS
                     if torch.equal(index.cpu(), relative_position_index(windows[-1], k)))
    shifted = misfm_shifted_windows(windows)
    mode = misfm_resolution_mode(state)
    if mode is None:
        log.warning("cannot tell the resolution mode from the weights (no stem has tracked batches); "
                    "assuming the paper's resolution_mode 1")
        mode = 1
    return {
        "name": "pctnet",
        "in_channels": _shape(state, "embeddings.0.proj.weight")[1],
        "feature_channels": channels,
        "depths": depths,
        "num_heads": heads,
        "window_size": _one_if_equal(windows),
        "shifted_windows": _one_if_equal(shifted),
        "resolution_mode": mode,
        "rel_pos_index": "exact" if kinds == {"exact"} else "reference",
        "deep_supervision": True,
    }


def _one_if_equal(values: list) -> list:
    """``[v]`` when every level has the same value ``v``, else ``values`` (the config's two forms)."""
    return values[:1] if len(set(values)) == 1 else values


def model_from_misfm(ckpt: dict[str, Any], overrides: list[str] | None = None,
                     resolution_mode: int | None = None, *, name: str = "the checkpoint",
                     partial: Sequence[str] | None = ()) -> tuple[nn.Module, Config, int, LoadReport]:
    """The network of an official MIS-FM / PyMIC checkpoint (``{"model_state_dict": ...}``), built from
    the architecture its weights show and loaded: ``(model, config, num_classes, load report)``.

    ``overrides`` (``model.FIELD=VALUE``) and ``resolution_mode`` set what the weights cannot show;
    ``config.model.rel_pos_index`` is the relative-position index the weights were trained with.
    ``name``: the file, for messages; ``partial``: as in :func:`load_pretrained` (None: the caller
    checks the report).
    """
    state = ckpt["model_state_dict"]
    try:
        model_cfg = model_config_from_misfm(state)
        num_classes = misfm_num_classes(state)
    except VolumeFusionError as exc:
        raise VolumeFusionError(f"{name}: {exc}") from None
    if resolution_mode is not None:
        model_cfg["resolution_mode"] = resolution_mode
    cfg = config.load(overrides=overrides, base={"model": model_cfg})
    model = build_model(cfg.model, num_classes)
    report = load_pretrained(model, ckpt, partial, name=name)
    cfg.model.rel_pos_index = report.rel_pos_index
    return model, cfg, num_classes, report
