"""Where and in which precision networks run: the one rule for training, prediction and the demo."""

from __future__ import annotations

import contextlib

import torch

from volumefusion import VolumeFusionError


def resolve_device(name: str | torch.device, local_rank: int = 0, *, setting: str = "device") -> torch.device:
    """The torch device for ``name``: ``"auto"`` (a GPU when there is one, else the CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``.

    ``"auto"`` and ``"cuda"`` pick GPU ``local_rank`` (the process's GPU under torchrun). ``setting``
    names where the value came from (``"run.device"``, ``"--device"``) in errors, which say what to do.
    """
    text = str(name)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise VolumeFusionError(f"{setting} {name!r}: not a device; choose auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VolumeFusionError(f"{setting} {name!r}: no CUDA device is available; use cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise VolumeFusionError(f"{setting} {name!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` ("auto": bf16 on CUDA, fp32 elsewhere; "bf16"; "fp32");
    None means no autocast (fp32)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise VolumeFusionError(f"precision {precision!r} is not allowed; choose auto, bf16 or fp32")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context for ``dtype`` from :func:`autocast_dtype` (a no-op context for None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
