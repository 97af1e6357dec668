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

import io
from pathlib import Path
from typing import Any

import torch

from volumefusion import VolumeFusionError, __version__
from volumefusion.io import atomic_write_bytes


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors name the file and the problem."""
    path = Path(path)
    if path.is_dir():
        found = next((p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "latest.pt",
                                  path / "best.pt", path / "latest.pt") if p.is_file()), None)
        hint = f", e.g. {found}" if found else ""
        raise VolumeFusionError(f"{path}: is a folder; give a checkpoint file{hint}")
    if not path.is_file():
        raise VolumeFusionError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        raise VolumeFusionError(f"{path}: a weights-only export for other tools; volumefusion commands read .pt "
                                "checkpoints (`volumefusion convert` writes one with --out)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise VolumeFusionError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); "
            "it may be truncated, or contain pickled objects that are not allowed for safety"
        ) from None
