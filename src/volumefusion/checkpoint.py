"""Self-describing checkpoints, written atomically and read without unpickling code.

A checkpoint is a dict:
  ``model``        plain state dict (no ``module.`` / ``_orig_mod.`` prefixes)
  ``config``       the full resolved :class:`~volumefusion.config.Config` as a dict
  ``task``         ``{"kind": "pretrain" | "segmentation", "num_classes": int,
                     "label_names": {str(int): str} | None, "preprocessing": dict}``
                   where ``preprocessing`` is the store's preparation settings (target spacing,
                   orientation, body crop) that predict must apply to new images
  ``optimizer``, ``scheduler``, ``scaler``  state dicts (absent in exported weights)
  ``step``         optimiser steps done
  ``rng``          RNG states for exact resume
  ``extra``        anything else the engine needs to resume (data position, best metric)
  ``version``      volumefusion version that wrote it
"""

from __future__ import annotations

import gzip
import io
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from volumefusion import VolumeFusionError, __version__
from volumefusion.files import atomic_write_bytes


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise ``payload`` to memory, then write it atomically (a killed run leaves no half file)."""
    payload = dict(payload, version=__version__)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


CHECKPOINT_KINDS = ("a checkpoint written by volumefusion (pretrain, finetune or convert) or a MIS-FM / PyMIC "
                    "PCT-Net checkpoint (.pt)")
"""What a command that takes any checkpoint expects, for error messages."""


def describe_file(path: Path) -> str:
    """What a file is, from its first bytes, for a message about a file that is not a loadable checkpoint:
    ``"a NIfTI image"``, ``"a safetensors weights file"``, ``"random-looking binary data"``..."""
    from volumefusion.io import sniff_image_format

    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return "a truncated or damaged zip archive (a torch checkpoint cut short?)"
        if any(n.endswith("/data.pkl") for n in names):
            return "a torch checkpoint archive"
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a zip archive of {len(names)} file(s) ({shown}), not a torch checkpoint"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(4096)
        except (OSError, EOFError, zlib.error):
            inner = b""
        kind = sniff_image_format(inner)
        return f"a gzip-compressed image file ({kind})" if kind else "gzip-compressed data"
    kind = sniff_image_format(head)
    if kind:
        return f"an image file ({kind})"
    header_size = int.from_bytes(head[:8], "little")
    if len(head) > 9 and head[8:9] == b"{" and 2 <= header_size <= path.stat().st_size - 8:
        return "a safetensors weights file (tensors without a config)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file"
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c.isspace() for c in text):
        return "a text file"
    return "binary data of no format volumefusion knows"


def _unsafe_globals(message: str) -> list[str]:
    """The Python objects a weights-only load refused, from torch's message."""
    return sorted(set(re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expected: str = CHECKPOINT_KINDS) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors name the file, say what it is and what the
    command ``expected`` (never suggesting an unsafe load)."""
    path = Path(path)
    if path.is_dir():
        found = next((p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "latest.pt",
                                  path / "best.pt", path / "latest.pt") if p.is_file()), None)
        hint = f", e.g. {found}" if found else ""
        raise VolumeFusionError(f"{path}: is a folder; give a checkpoint file{hint}")
    if not path.is_file():
        raise VolumeFusionError(f"{path}: checkpoint file not found")
    try:
        what = describe_file(path)
    except OSError as exc:
        raise VolumeFusionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if what.startswith("a safetensors"):
        raise VolumeFusionError(f"{path}: {what}, an export for other tools; expected {expected}")
    if what not in ("a torch checkpoint archive", "a Python pickle"):
        raise VolumeFusionError(f"{path}: {what}; expected {expected}")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files not written by torch.save; the error
            # below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        refused = _unsafe_globals(str(exc))
        if refused:
            problem = (f"holds Python objects other than tensors and plain data ({', '.join(refused[:3])}), "
                       "which volumefusion never unpickles (unpickling can run code); save the weights as a "
                       "plain dict of tensors")
        elif what == "a Python pickle":
            problem = ("a Python pickle that is not a torch checkpoint, or holds objects other than tensors "
                       "and plain data, which volumefusion never unpickles (unpickling can run code)")
        else:
            problem = "a torch checkpoint that cannot be read (truncated or damaged; copy it again)"
        raise VolumeFusionError(f"{path}: {problem}; expected {expected}") from None
