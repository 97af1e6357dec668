"""Sliding-window inference: Gaussian-weighted patches, batched windows, mirror TTA, bf16 on GPU.

The volume is covered by a regular grid of windows (``patch_size``, neighbours overlapping by
``overlap`` of a patch, spread evenly so the last window ends at the border). Each window's softmax
is weighted by a Gaussian importance map (sigma = patch / 8 per axis, so a voxel is decided mostly by
windows that see it near their centre) and the weighted probabilities are averaged.

Memory: windows run in z order and the weighted sums live in a ring buffer that spans only the
z-range the windows in flight can touch (about ``patch_z + step_z`` slices, not the whole volume).
As soon as no later window can touch a z-slab, the slab is normalised and handed out, so callers
that keep only labels (:func:`sliding_window_segmentation`) need ``C x (patch_z + step_z) x H x W``
float32 for the sums plus one byte per voxel for the labels. The normaliser (the sum of the weights
over the windows covering a voxel) needs no buffer: the Gaussian is a product of 1-D Gaussians and
the windows form a Cartesian grid, so the sum is a product of three 1-D sums.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volumefusion import VolumeFusionError
from volumefusion.checkpoint import read_checkpoint
from volumefusion.config import Config
from volumefusion.data.datasets import CaseTask, case_id_from_path, discover_inputs, unique_case_ids
from volumefusion.device import autocast, autocast_dtype, resolve_device
from volumefusion.files import check_writable_folder, folder_lock, resolved
from volumefusion.io import IMAGE_SUFFIXES, SERIES_SEPARATOR, read_image, write_image
from volumefusion.log import get_logger
from volumefusion.log import progress as progress_bar
from volumefusion.nets import deep_supervision_owner, main_output
from volumefusion.preprocess import (
    PrepareSettings,
    normalise_hu,
    preprocess_case,
    restore_to_original,
    suspicious_values,
)
from volumefusion.weights import model_from_checkpoint

log = get_logger(__name__)

Emit = Callable[[int, torch.Tensor], None]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """First index of each window along one axis of ``size`` voxels (``size >= patch``).

    Windows are spaced at most ``patch * (1 - overlap)`` apart, evenly, the first at 0 and the
    last ending at ``size``; never more windows than there are distinct positions (an overlap close
    to 1 would otherwise ask for thousands of windows, most of them the same).
    """
    if size <= patch:
        return [0]
    count = min(math.ceil((size - patch) / (patch * (1.0 - overlap))) + 1, size - patch + 1)
    step = (size - patch) / (count - 1)
    return [round(i * step) for i in range(count)]


@functools.lru_cache(maxsize=16)
def _gaussian_1d(length: int, device: torch.device) -> torch.Tensor:
    """(length,) float32 Gaussian, sigma = length / 8, maximum 1 at the centre."""
    x = torch.arange(length, dtype=torch.float64) - (length - 1) / 2
    g = torch.exp(-0.5 * (x / (length / 8.0)) ** 2)
    return (g / g.max()).float().to(device)


@functools.lru_cache(maxsize=4)
def importance_map(patch_size: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(pz, py, px) float32 Gaussian importance map (outer product of 1-D Gaussians), cached."""
    gz, gy, gx = (_gaussian_1d(p, device) for p in patch_size)
    return gz[:, None, None] * gy[None, :, None] * gx[None, None, :]


def _coverage(size: int, patch: int, starts: Sequence[int], device: torch.device) -> torch.Tensor:
    """(size,) float32: sum over the windows along one axis of their 1-D Gaussian at each index."""
    g = _gaussian_1d(patch, device)
    total = torch.zeros(size, dtype=torch.float32, device=device)
    for s in starts:
        total[s:s + patch] += g
    return total


def flip_sets(tta: bool | Sequence[int]) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each TTA pass: every subset of the mirrored spatial axes.

    ``tta``: False (no TTA), True (mirror z, y and x: 8 passes) or spatial axes, e.g. ``(1, 2)`` to
    mirror y and x only (4 passes). Returns dims of an (N, C, D, H, W) tensor; ``()`` = no flip.
    """
    axes = (0, 1, 2) if tta is True else () if tta is False else tuple(sorted(set(int(a) for a in tta)))
    if any(a not in (0, 1, 2) for a in axes):
        raise VolumeFusionError(f"TTA axes {tuple(tta)} must be spatial axes 0 (z), 1 (y) or 2 (x)")
    dims = [a + 2 for a in axes]
    return [subset for r in range(len(dims) + 1) for subset in itertools.combinations(dims, r)]


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP (``module``) and torch.compile (``_orig_mod``) wrappers."""
    while True:
        inner = next((getattr(model, a) for a in ("module", "_orig_mod")
                      if isinstance(getattr(model, a, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode with deep supervision off (one full-resolution output); restored on exit."""
    owner = deep_supervision_owner(_unwrap(model))
    was_training = model.training
    deep_supervision = getattr(owner, "deep_supervision", None)
    model.eval()
    if owner is not None:
        owner.deep_supervision = False
    try:
        yield
    finally:
        model.train(was_training)
        if owner is not None:
            owner.deep_supervision = deep_supervision


def _forward_probabilities(model: nn.Module, x: torch.Tensor, num_classes: int, flips: list[tuple[int, ...]],
                           autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Softmax of ``model(x)`` averaged over the mirror passes: (B, num_classes, pz, py, px) float32."""
    total = None
    for dims in flips:
        xi = x.flip(dims) if dims else x
        with autocast(x.device, autocast_dtype):
            out = main_output(model(xi))
        if out.shape[1] != num_classes:
            raise VolumeFusionError(
                f"the network outputs {out.shape[1]} channels but {num_classes} classes were expected"
            )
        probs = out.float().softmax(dim=1)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total.add_(probs)
    return total.div_(len(flips)) if len(flips) > 1 else total


def _ring(start: int, stop: int, length: int) -> list[tuple[int, int, int]]:
    """Pieces of the z-range [start, stop) in a ring buffer of ``length`` slices:
    ``(ring_start, ring_stop, offset in the range)``; at most two pieces when ``stop - start <= length``."""
    pieces, z = [], start
    while z < stop:
        r = z % length
        n = min(stop - z, length - r)
        pieces.append((r, r + n, z - start))
        z += n
    return pieces


def _check_patch(model: nn.Module, patch_size: Sequence[int]) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise VolumeFusionError(f"patch size {list(patch_size)} must be three positive integers (z, y, x)")
    divisor = getattr(_unwrap(model), "size_divisor", None)
    if divisor is not None and any(p % d for p, d in zip(patch, divisor)):
        raise VolumeFusionError(
            f"patch size {list(patch)} must be a multiple of the network's size divisor {list(divisor)} "
            "on each axis (z, y, x)"
        )
    return patch  # type: ignore[return-value]


def _sliding_window(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], num_classes: int,
                    emit: Emit, *, overlap: float, window_batch: int, device: str | torch.device | None,
                    precision: str, tta: bool | Sequence[int], progress: bool | str,
                    pad_value: float, channels_last: bool = False) -> None:
    """Run the windows in z order and call ``emit(z0, probs)`` for consecutive finished z-slabs.

    ``probs``: (num_classes, dz, H, W) float32 on the compute device, normalised probabilities of
    slices ``z0 .. z0 + dz - 1`` of the input; the slabs cover the volume once, in order.
    """
    if image.ndim != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, D, H, W), got {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise VolumeFusionError(f"overlap {overlap} must be in [0, 1)")
    if window_batch < 1:
        raise VolumeFusionError(f"window batch {window_batch} must be >= 1")
    if device is None:  # the model's device (CPU for a model without parameters)
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    dev = torch.device(device)
    dtype = autocast_dtype(precision, dev)
    flips = flip_sets(tta)
    patch = _check_patch(model, patch_size)
    pz, py, px = patch
    size = tuple(image.shape[2:])

    # Images smaller than the patch are padded (centred) with air, so windows match training crops.
    pad = [max(p - n, 0) for p, n in zip(patch, size)]
    low = [p // 2 for p in pad]
    image = image.to(dev, dtype=torch.float32)
    if any(pad):
        widths = [w for axis in (2, 1, 0) for w in (low[axis], pad[axis] - low[axis])]
        image = F.pad(image, widths, value=pad_value)
    padded = tuple(image.shape[2:])

    starts = [window_starts(n, p, overlap) for n, p in zip(padded, patch)]
    windows = list(itertools.product(*starts))  # z-major, so z-starts never decrease
    batches = [windows[i:i + window_batch] for i in range(0, len(windows), window_batch)]
    coverage = [_coverage(n, p, s, dev) for n, p, s in zip(padded, patch, starts)]
    weight = importance_map(patch, dev)

    # The ring holds every slice from the first unfinished one to the end of the last window of a batch.
    length = min(max(b[-1][0] - b[0][0] for b in batches) + pz, padded[0])
    acc = torch.zeros((num_classes, length, padded[1], padded[2]), dtype=torch.float32, device=dev)
    (z_lo, y_lo, x_lo), (d, h, w) = low, size
    yx_norm = coverage[1][y_lo:y_lo + h, None] * coverage[2][None, x_lo:x_lo + w]
    done = 0  # slices before this one are finished and emitted

    def finish(upto: int) -> None:
        nonlocal done
        keep_from, keep_to = max(done, z_lo), min(upto, z_lo + d)  # drop the padding slices
        if keep_to > keep_from:
            for r0, r1, offset in _ring(keep_from, keep_to, length):
                z0 = keep_from + offset
                norm = coverage[0][z0:z0 + r1 - r0, None, None] * yx_norm
                emit(z0 - z_lo, acc[:, r0:r1, y_lo:y_lo + h, x_lo:x_lo + w] / norm)
        for r0, r1, _ in _ring(done, upto, length):
            acc[:, r0:r1].zero_()
        done = upto

    with _eval_mode(model), torch.inference_mode():
        bar = progress_bar(batches, desc=progress if isinstance(progress, str) else "windows", unit="batch",
                           leave=False, disable=not progress)
        for batch in bar:
            if batch[0][0] > done:
                finish(batch[0][0])
            crops = torch.stack([image[0, :, z:z + pz, y:y + py, x:x + px] for z, y, x in batch])
            if channels_last:
                crops = crops.contiguous(memory_format=torch.channels_last_3d)
            probs = _forward_probabilities(model, crops, num_classes, flips, dtype).mul_(weight)
            for (z, y, x), p in zip(batch, probs):
                for r0, r1, offset in _ring(z, z + pz, length):
                    acc[:, r0:r1, y:y + py, x:x + px] += p[:, offset:offset + r1 - r0]
        finish(padded[0])


def sliding_window_inference(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                             num_classes: int, *, overlap: float = 0.5, window_batch: int = 4,
                             device: str | torch.device | None = None, precision: str = "auto",
                             tta: bool | Sequence[int] = False, out_device: str | torch.device = "cpu",
                             out_dtype: torch.dtype = torch.float32, progress: bool | str = False,
                             pad_value: float = -1.0, channels_last: bool = False) -> torch.Tensor:
    """Class probabilities of a whole volume by Gaussian-weighted sliding windows.

    ``model``: a segmentation network already on ``device`` (default: the device of its parameters);
    a list output (deep supervision) uses its first, full-resolution element, and a
    ``deep_supervision`` attribute is switched off during the call. ``image``: (1, C, D, H, W) float,
    normalised as in training (any device). ``patch_size``: (z, y, x) window in voxels, a multiple
    of ``model.size_divisor`` when the model has one; volumes smaller than the patch are padded with
    ``pad_value`` (-1 = air after :func:`~volumefusion.preprocess.normalise_hu`). ``overlap``: share
    of a window overlapping its neighbour, in [0, 1). ``window_batch``: windows per forward pass.
    ``precision``: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32". ``tta``: mirror
    test-time augmentation, see :func:`flip_sets`. ``progress``: show a progress bar over the window
    batches (a string labels it). ``channels_last``: pass windows in the ``channels_last_3d`` memory
    format, for a model converted with ``model.to(memory_format=torch.channels_last_3d)`` (faster
    bf16 convolutions on GPU).

    Returns (num_classes, D, H, W) softmax probabilities (``out_dtype``, on ``out_device``).
    The full output costs ``num_classes x D x H x W`` values; for large volumes where only labels
    are needed use :func:`sliding_window_segmentation`.
    """
    _, _, d, h, w = image.shape
    out = torch.empty((num_classes, d, h, w), dtype=out_dtype, device=out_device)

    def emit(z0: int, probs: torch.Tensor) -> None:
        out[:, z0:z0 + probs.shape[1]].copy_(probs)

    _sliding_window(model, image, patch_size, num_classes, emit, overlap=overlap, window_batch=window_batch,
                    device=device, precision=precision, tta=tta, progress=progress, pad_value=pad_value,
                    channels_last=channels_last)
    return out


def sliding_window_segmentation(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                                num_classes: int, *, probabilities: bool = False, overlap: float = 0.5,
                                window_batch: int = 4, device: str | torch.device | None = None,
                                precision: str = "auto", tta: bool | Sequence[int] = False,
                                progress: bool | str = False, pad_value: float = -1.0,
                                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label map (argmax) of a whole volume, computed slab by slab to keep memory small.

    Same arguments as :func:`sliding_window_inference`. Returns ``(labels, probs)`` on the CPU:
    ``labels`` (D, H, W) uint8 class indices (``num_classes <= 256``); ``probs`` (num_classes, D, H, W)
    float16 probabilities when ``probabilities`` is True (2 bytes per class and voxel), else None.
    Beyond the input, peak memory is the ring buffer described in the module docstring plus the outputs.
    """
    if num_classes > 256:
        raise VolumeFusionError(f"{num_classes} classes do not fit uint8 labels (at most 256)")
    _, _, d, h, w = image.shape
    labels = torch.empty((d, h, w), dtype=torch.uint8)
    probs_out = torch.empty((num_classes, d, h, w), dtype=torch.float16) if probabilities else None

    def emit(z0: int, probs: torch.Tensor) -> None:
        labels[z0:z0 + probs.shape[1]].copy_(probs.argmax(dim=0))
        if probs_out is not None:
            probs_out[:, z0:z0 + probs.shape[1]].copy_(probs)

    _sliding_window(model, image, patch_size, num_classes, emit, overlap=overlap, window_batch=window_batch,
                    device=device, precision=precision, tta=tta, progress=progress, pad_value=pad_value,
                    channels_last=channels_last)
    return labels, probs_out


# --------------------------------------------------------------------------------------------------
# whole images: checkpoint -> preprocessing -> sliding window -> original grid


class Predictor:
    """A trained segmentation network with the preprocessing it was trained with.

    Build it with :meth:`from_checkpoint`; :meth:`predict` maps an image as read by
    :func:`volumefusion.io.read_image` to a label map on the same grid.
    """

    def __init__(self, model: nn.Module, cfg: Config, task: dict, device: torch.device, *,
                 patch_size: Sequence[int] | None = None, overlap: float | None = None,
                 window_batch: int | None = None, tta: bool | Sequence[int] = False,
                 precision: str | None = None):
        # channels_last_3d is the layout cuDNN's fast bf16 3D convolutions want; CPU keeps the default.
        self.channels_last = device.type == "cuda"
        memory_format = torch.channels_last_3d if self.channels_last else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format).eval()
        self.cfg = cfg
        self.device = device
        self.num_classes = int(task["num_classes"])
        names = task.get("label_names") or {}
        self.label_names = {int(k): str(v) for k, v in names.items()} or {
            k: str(k) for k in range(self.num_classes)
        }
        self.settings = PrepareSettings.from_dict(task.get("preprocessing") or {})
        self.patch_size = tuple(int(p) for p in (patch_size or cfg.data.crop_size))
        self.overlap = cfg.finetune.overlap if overlap is None else overlap
        self.window_batch = cfg.finetune.window_batch if window_batch is None else window_batch
        # TTA mirrors the axes that training mirrored (finetune.mirror_axes) unless told otherwise.
        self.tta = tuple(cfg.finetune.mirror_axes) if tta is True else tta
        self.precision = precision or cfg.run.precision
        _check_patch(self.model, self.patch_size)
        flip_sets(self.tta)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "auto", **options) -> Predictor:
        """Load a volumefusion checkpoint (model, config, task; a file, ``builtin:NAME`` or a
        :class:`~volumefusion.checkpoint.Checkpoint` already read); ``options`` as in the constructor."""
        ckpt = read_checkpoint(path, expected="a checkpoint written by `volumefusion finetune`")
        ckpt.require("predict needs a model trained with `volumefusion finetune` (fine-tune an official MIS-FM "
                     "checkpoint first)", "config", "task", "num_classes")
        if ckpt.task.get("kind") == "pretrain":
            log.warning("%s is a pretraining checkpoint: its classes are Volume Fusion mixing levels, not anatomy",
                        ckpt.source)
        if ckpt.run_config().model.in_channels != 1:
            raise ckpt.error(f"the model takes {ckpt.run_config().model.in_channels} input channels; predict "
                             "handles single-channel CT")
        model, cfg, _ = model_from_checkpoint(ckpt)
        return cls(model, cfg, ckpt.task, resolve_device(device, setting="device"), **options)

    def predict(self, image, geometry, *, probabilities: bool = False, progress: bool | str = False):
        """Segment one CT image.

        ``image``: (z, y, x) HU, any numeric dtype; ``geometry``: its
        :class:`~volumefusion.geometry.Geometry`. The image goes through the checkpoint's
        :func:`~volumefusion.preprocess.preprocess_case` and ``normalise_hu``, is segmented in
        prepared space and mapped back with ``restore_to_original``. Returns ``(labels, probs)`` as
        numpy arrays on the original grid: ``labels`` (z, y, x) uint8 class indices; ``probs``
        (num_classes, z, y, x) uint8 with probability = value / 255 when ``probabilities``, else None.
        """


        prepared = preprocess_case(image, geometry, self.settings)
        restore = prepared.restore
        window = self.cfg.data.hu_window
        x = normalise_hu(torch.from_numpy(prepared.image), window)[None, None]
        del prepared  # the int16 copy is no longer needed; large CTs need the memory
        pad_value = float(normalise_hu(torch.tensor(self.cfg.data.pad_value), window))
        labels, probs = sliding_window_segmentation(
            self.model, x, self.patch_size, self.num_classes, probabilities=probabilities,
            overlap=self.overlap, window_batch=self.window_batch, device=self.device,
            precision=self.precision, tta=self.tta, progress=progress, pad_value=pad_value,
            channels_last=self.channels_last,
        )
        del x
        labels = restore_to_original(labels.numpy(), restore, order=0, fill=0)
        if probs is None:
            return labels, None
        # One class at a time keeps the float copy small. Outside the body crop everything is
        # background: probability 1 for class 0, 0 for the others.
        restored = np.stack([
            restore_to_original(probs[k].float().mul_(255).round_().to(torch.uint8).numpy(), restore,
                                order=1, fill=255 if k == 0 else 0)
            for k in range(self.num_classes)
        ])
        return labels, restored


# --------------------------------------------------------------------------------------------------
# folders: inputs -> one label map file per case


@dataclass
class PredictSummary:
    """What :func:`predict_files` did: ``written`` case ids; ``failed`` ``(input, reason)`` pairs whose
    reason names the input; ``warnings`` about suspicious values of cases segmented anyway, each
    naming the input (:func:`~volumefusion.preprocess.suspicious_values`)."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{len(self.written)} of {len(self.written) + len(self.failed)} cases written to {self.out_dir}"]
        lines += [f"  failed: {reason}" for _, reason in self.failed]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def output_path(out_dir: Path, source: Path, case: str, fmt: str) -> Path:
    """``OUT_DIR/CASE.<ext>``: NIfTI, or with ``fmt="same"`` the input's image extension."""
    suffix = ".nii.gz"
    if fmt == "same":
        name = source.name.lower()
        suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), ".nii.gz")
    return out_dir / f"{case}{suffix}"


def check_outputs_spare_inputs(inputs: list[Path], outputs: list[Path]) -> None:
    """VolumeFusionError if any output path is one of the input files (``-o`` = ``-i`` folder)."""
    sources = {resolved(str(p).split(SERIES_SEPARATOR)[0]) for p in inputs}
    clash = [p for p in outputs if resolved(p) in sources]
    if clash:
        raise VolumeFusionError(f"{clash[0]}: the output would overwrite this input image "
                                f"({len(clash)} in all); pass another -o folder")


def predict_files(model: str | Path | Predictor, inputs: str | Path | Sequence[str | Path], out_dir: str | Path, *,
                  device: str | torch.device = "auto", patch_size: Sequence[int] | None = None,
                  overlap: float | None = None, window_batch: int | None = None,
                  tta: bool | Sequence[int] = False, precision: str | None = None,
                  save_probabilities: bool = False, fmt: str = "nii.gz",
                  channel: int | None = None) -> PredictSummary:
    """Segment every image named by ``inputs`` and write one label map per case into ``out_dir``.

    ``model``: a checkpoint written by fine-tuning, or a :class:`Predictor` (then ``device``,
    ``patch_size``, ``overlap``, ``window_batch``, ``tta`` and ``precision`` are its own).
    ``inputs``: one or a list of image files (NIfTI, NRRD, MHA), folders, DICOM series folders, globs
    or .txt/.csv lists, as :func:`volumefusion.data.datasets.discover_inputs` takes them; case ids as
    ``prepare`` makes them.
    Writes ``CASE.nii.gz`` (``fmt="same"``: the input's format), uint8 class indices on the input's
    grid, and with ``save_probabilities`` ``probabilities/CASE_classK.nii.gz`` (uint8, probability =
    value / 255). ``channel`` picks one channel of 4D inputs. A case that fails is recorded in the
    summary and skipped; an ``out_dir`` where an output would replace an input, or that cannot be
    written, is refused up front, before the model is loaded.

    Example::

        summary = predict_files("runs/ft/checkpoints/best.pt", ["ct/"], "preds/", tta=True)
        print(summary.format())
    """
    failed: list[tuple[str, str]] = []
    if isinstance(inputs, (str, Path)):  # one input, not a sequence of letters
        inputs = [inputs]
    found = discover_inputs([str(i) for i in inputs], failed)
    cases = unique_case_ids([CaseTask(case_id_from_path(p), str(p)) for p in found], failed)
    out_dir = Path(out_dir)
    outputs = {c.case_id: output_path(out_dir, Path(c.image), c.case_id, fmt) for c in cases}
    check_outputs_spare_inputs(found, list(outputs.values()))
    # before the model is loaded and any case segmented: a run must not end in unwritable outputs
    check_writable_folder(out_dir, "-o")
    if save_probabilities:
        check_writable_folder(out_dir / "probabilities", "-o")
    folders = [p for p in outputs.values() if p.is_dir()]
    if folders:
        raise VolumeFusionError(f"{folders[0]}: a folder has the name of this output ({len(folders)} in all); "
                                "move it, or pass another -o folder")
    predictor = model if isinstance(model, Predictor) else Predictor.from_checkpoint(
        model, device, patch_size=patch_size, overlap=overlap, window_batch=window_batch, tta=tta,
        precision=precision,
    )
    log.info("%d inputs; %s on %s, patch %s, overlap %g, window batch %d%s", len(found),
             predictor.cfg.model.name, predictor.device, list(predictor.patch_size), predictor.overlap,
             predictor.window_batch, ", mirror TTA" if predictor.tta else "")

    summary = PredictSummary(out_dir, failed=failed)
    with folder_lock(out_dir, "-o"):
        _predict_cases(predictor, cases, outputs, out_dir, summary, save_probabilities, channel)
    return summary


def _predict_cases(predictor: Predictor, cases: list[CaseTask], outputs: dict[str, Path], out_dir: Path,
                   summary: PredictSummary, save_probabilities: bool, channel: int | None) -> None:
    failed = summary.failed
    for task in cases:
        source, case = task.image, task.case_id
        started = time.perf_counter()
        try:
            image, geometry = read_image(source, channel=channel)
            for warning in suspicious_values(image, geometry.spacing_zyx):
                summary.warnings.append(f"{source}: {warning}")
                log.warning("%s", summary.warnings[-1])
            labels, probs = predictor.predict(image, geometry, probabilities=save_probabilities, progress=case)
            del image
            try:
                write_image(outputs[case], labels, geometry)
                for k, class_probs in enumerate(probs if probs is not None else []):
                    write_image(out_dir / "probabilities" / f"{case}_class{k}.nii.gz", class_probs, geometry)
            except OSError as exc:  # a full disk: this case's outputs are not written (atomic writes)
                raise VolumeFusionError(f"{exc.filename}: cannot write ({exc.strerror})") from None
        except Exception as exc:  # one bad case must not stop the others; it is reported in the summary
            reason = str(exc) if isinstance(exc, VolumeFusionError) else f"{type(exc).__name__}: {exc}"
            reason = reason.splitlines()[0] if reason else type(exc).__name__
            failed.append((source, reason if source in reason else f"{source}: {reason}"))
            log.debug("case %s failed", case, exc_info=True)
            continue
        summary.written.append(case)
        log.info("%s: %s in %.1f s", case, "x".join(map(str, geometry.shape_zyx[::-1])),
                 time.perf_counter() - started)
