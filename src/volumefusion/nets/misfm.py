"""The official MIS-FM / PyMIC PCT-Net checkpoints: their tensor names and the architecture their
weights show.

Their state dicts (``{'model_state_dict': ...}``) store three stems (``embeddings.{0,1,2}``) and three
heads (``pred_heads.{0,1,2}``); the pair of the model's ``resolution_mode`` is mapped onto ``stem.`` /
``head.`` and the others are unused. Their remaining names map onto ours by :func:`misfm_key`.
:func:`model_config_from_misfm` reads the ``model`` config section from the shapes (and the
relative-position index) of the weights. Plain functions of a state dict without wrapper prefixes
(``module.``, ``_orig_mod.``), as the reader gives it: reading the file is
:func:`volumefusion.checkpoint.read_checkpoint`'s, loading it into a network
:func:`volumefusion.weights.load_pretrained`'s.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from volumefusion import VolumeFusionError
from volumefusion.log import get_logger
from volumefusion.nets.pctnet import REL_POS_KINDS, relative_position_index

log = get_logger(__name__)

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


def is_misfm_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict (without wrapper prefixes) holds MIS-FM PCT-Net tensor names."""
    return any(k.startswith(MISFM_PREFIXES) for k in state)


# --------------------------------------------------------------------------------------------------
# the architecture the weights show


def _shape(state: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state:
        raise VolumeFusionError(f"not a MIS-FM PCT-Net state dict: key {key!r} is missing")
    return state[key].shape


def misfm_num_classes(state: dict[str, torch.Tensor]) -> int:
    """Output classes of a MIS-FM PCT-Net state dict."""
    return _shape(state, "pred_heads.0.out_conv0.conv.2.weight")[0]


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
