"""Crop loaders: infinite, deterministic streams of int16 crops from a prepared store.

* :class:`PretrainLoader` yields pairs of crops for Volume Fusion (a background and a foreground
  crop per sample, from two different cases, or from the same case in grid mode).
* :class:`SegmentationLoader` yields image + label crops for fine-tuning, a share of them centred on
  a random foreground voxel of a random class present in the case.

Determinism and resume: the batch of step ``s`` is a function of ``(seed, rank, s)`` alone (its own
``numpy`` generator), so a loader started at ``start_step=s`` continues the stream a run stopped at,
and each DDP rank draws its own samples. With ``workers=W`` worker ``w`` builds steps
``start_step + w, start_step + w + W, ...``; the DataLoader takes them round-robin, so the order is
the same for any number of workers.

Cost: a crop reads only the store chunks it touches (no whole case is read per sample); nothing loops
over voxels in Python. A loader holds its cases as one int64 array of rows of the store's index (a
memory-mapped file, see :mod:`volumefusion.data.index`), never as Python objects per case, so
starting it costs no per-case work and forked workers share all of it. The segmentation loader
additionally reads each case's whole label once per worker process, the first time that case is
drawn for a foreground crop, and keeps up to ``FOREGROUND_SAMPLES`` voxel positions per class
(12 bytes each: about 120 kB per class and case).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from volumefusion import VolumeFusionError
from volumefusion.data.index import CaseInfo
from volumefusion.data.store import Store
from volumefusion.log import get_logger

log = get_logger(__name__)

FOREGROUND_SAMPLES = 10_000
"""Voxel positions kept per class and case for foreground-centred crops (drawn uniformly)."""


# --------------------------------------------------------------------------------------------------
# Crop geometry


def _clamp_start(start: int, size: int, crop: int) -> int:
    """Keep a crop inside the array, or, for an array shorter than the crop, covering all of it."""
    lo, hi = sorted((0, size - crop))
    return int(min(max(start, lo), hi))


def _uniform_start(rng: np.random.Generator, box: tuple[int, int], size: int, crop: int) -> int:
    """A uniform crop start along one axis.

    Inside the body box ``[box[0], box[1])`` when it is at least as long as the crop; otherwise
    uniform among the positions that cover the whole box and stay inside the array (or, for an
    array shorter than the crop, cover the whole array; the rest is padding).
    """
    lo, hi = box
    if hi <= lo:  # no body found: the whole array is the box
        lo, hi = 0, size
    if hi - lo >= crop:
        return int(rng.integers(lo, hi - crop + 1))
    first = max(hi - crop, min(0, size - crop))
    last = min(lo, max(0, size - crop))
    return int(rng.integers(first, last + 1))


def _read_crop(array, shape: Sequence[int], start: Sequence[int], out: np.ndarray, pad_value) -> None:
    """Fill ``out`` (D, H, W) with ``array[start : start + out.shape]``, ``pad_value`` outside the array.

    Only the part of the crop inside the array is read from ``array`` (a store array: it decompresses
    just the chunks it touches).
    """
    src, dst = [], []
    for s, n, size in zip(start, out.shape, shape):
        lo, hi = max(s, 0), min(s + n, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    inside = all(d.stop - d.start == n for d, n in zip(dst, out.shape))
    if not inside:
        out.fill(pad_value)
    if all(s.stop > s.start for s in src):
        out[tuple(dst)] = array[tuple(src)]


# --------------------------------------------------------------------------------------------------
# Per-process state and the step stream


class _Arrays:
    """Store arrays opened by one process (a worker or the main process), reused across steps."""

    def __init__(self, store: Store):
        self.store = store
        self._images: dict[str, object] = {}
        self._labels: dict[str, object] = {}
        self.foreground: dict[str, dict[int, np.ndarray]] = {}

    def image(self, case_id: str):
        if case_id not in self._images:
            self._images[case_id] = self.store.image(case_id)
        return self._images[case_id]

    def label(self, case_id: str):
        if case_id not in self._labels:
            self._labels[case_id] = self.store.label(case_id)
        return self._labels[case_id]


class _Steps(IterableDataset):
    """Batches ``source.batch(step, arrays)`` for steps ``start_step, start_step + 1, ...``, split
    round-robin over DataLoader workers."""

    def __init__(self, source, start_step: int):
        super().__init__()
        self.source, self.start_step = source, start_step

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        step, stride = (self.start_step, 1) if info is None else (self.start_step + info.id, info.num_workers)
        arrays = _Arrays(self.source.store)  # opened here: file handles are never shared across processes
        while True:
            yield self.source.batch(step, arrays)
            step += stride


def _step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, step])


class _Loader:
    """Shared options and validation of the two loaders; iterating starts a DataLoader."""

    def __init__(self, store: Store, case_ids: Sequence[str] | None, crop_size, batch_size: int, *, seed: int,
                 rank: int, world_size: int, workers: int, start_step: int, pad_value: float,
                 allow_padding: bool, pin_memory: bool | None, prefetch: int):
        if len(store) == 0:
            raise VolumeFusionError(f"{store.path}: the store holds no cases; run `volumefusion prepare`")
        crop = tuple(int(c) for c in crop_size)
        if len(crop) != 3 or min(crop) < 1:
            raise VolumeFusionError(f"crop_size {list(crop_size)}: need three positive sizes (z, y, x)")
        if batch_size < 1:
            raise VolumeFusionError(f"batch_size {batch_size}: need at least 1")
        if not 0 <= rank < world_size:
            raise VolumeFusionError(f"rank {rank} is not in [0, world_size={world_size})")
        if workers < 0 or start_step < 0 or prefetch < 1:
            raise VolumeFusionError(f"workers ({workers}) and start_step ({start_step}) must be >= 0, "
                                    f"prefetch ({prefetch}) >= 1")
        if case_ids is None:
            rows = np.arange(len(store), dtype=np.int64)
        else:
            if not case_ids:
                raise VolumeFusionError("the loader was given an empty list of cases")
            rows = store.rows(case_ids)
        if not allow_padding:
            fits = (store.index.rows["shape"][rows] >= np.array(crop)).all(axis=1)
            if not fits.any():
                first = store.index.info(rows[0])
                raise VolumeFusionError(
                    f"{store.path}: crop {list(crop)} is larger than every case (e.g. {first.id} is "
                    f"{list(first.shape)}); use a smaller data.crop_size or allow padding")
            if not fits.all():
                log.warning("%d of %d cases are smaller than the crop %s: skipped (padding not allowed)",
                            int((~fits).sum()), len(rows), list(crop))
            rows = rows[fits]
        self.store, self.rows, self.crop, self.batch_size = store, rows, crop, int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.workers, self.start_step, self.prefetch = int(workers), int(start_step), int(prefetch)
        self.pad_value = int(np.clip(round(pad_value), -32768, 32767))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

    def _case(self, index: int) -> CaseInfo:
        """The ``index``-th case of this loader."""
        return self.store.index.info(self.rows[index])

    def _crop_image(self, arrays: _Arrays, record: CaseInfo, start, out: np.ndarray) -> None:
        _read_crop(arrays.image(record.id), record.shape, start, out, self.pad_value)

    def _uniform_crop_start(self, rng: np.random.Generator, record: CaseInfo) -> list[int]:
        return [_uniform_start(rng, box, size, crop)
                for box, size, crop in zip(record.body_box, record.shape, self.crop)]

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            _Steps(self, self.start_step), batch_size=None, num_workers=self.workers,
            generator=torch.Generator(),  # keep the global RNG (dropout) untouched by loader creation
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch if self.workers else None,
        )
        return iter(loader)


# --------------------------------------------------------------------------------------------------
# The two loaders


class PretrainLoader(_Loader):
    """Pairs of random crops for Volume Fusion.

    Iterating yields, per step, ``{"background": int16 (N, 1, D, H, W), "foreground": int16
    (N, 1, D, H, W), "case_ids": [[background_id, foreground_id]] * N, "step": int}`` in HU, without
    end. Cases are drawn uniformly; the foreground case is drawn uniformly among the *other* cases
    whenever the store has more than one (a crop is never fused with its own case), or is the same
    case with ``same_case=True`` (grid mode: an independent crop of the same volume). Crop positions
    are uniform inside each case's body box (see :func:`_uniform_start`); parts of a crop outside
    the array hold ``pad_value``.

    Args:
        store: the prepared store.
        crop_size: ``(D, H, W)`` voxels.
        batch_size: samples per step (per process).
        seed, rank: the stream is a function of ``(seed, rank, step)``.
        world_size: number of DDP processes (checked against ``rank``).
        workers: DataLoader worker processes (0: build batches in the calling process).
        start_step: first step of the stream (resume).
        pad_value: HU of padding.
        same_case: grid mode (see above).
        allow_padding: if False, cases smaller than the crop are skipped (an error if that is all).
        pin_memory: page-locked batches for fast host-to-GPU copies; None: when CUDA is available.
        prefetch: batches prefetched per worker.
    """

    def __init__(self, store: Store, crop_size, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, start_step: int = 0, pad_value: float = -1024,
                 same_case: bool = False,
                 allow_padding: bool = True, pin_memory: bool | None = None, prefetch: int = 2):
        super().__init__(store, None, crop_size, batch_size, seed=seed, rank=rank, world_size=world_size,
                         workers=workers, start_step=start_step, pad_value=pad_value,
                         allow_padding=allow_padding, pin_memory=pin_memory, prefetch=prefetch)
        self.same_case = bool(same_case)
        if len(self.rows) == 1 and not same_case:
            log.warning("the store has one case: Volume Fusion will fuse crops of that case with each other")

    def batch(self, step: int, arrays: _Arrays) -> dict:
        rng = _step_rng(self.seed, self.rank, step)
        n, count = self.batch_size, len(self.rows)
        background = np.empty((n, 1, *self.crop), dtype=np.int16)
        foreground = np.empty_like(background)
        ids = []
        for i in range(n):
            b = int(rng.integers(count))
            f = b if self.same_case or count == 1 else (b + int(rng.integers(1, count))) % count
            pair = []
            for index, out in ((b, background), (f, foreground)):
                record = self._case(index)
                self._crop_image(arrays, record, self._uniform_crop_start(rng, record), out[i, 0])
                pair.append(record.id)
            ids.append(pair)
        return {"background": torch.from_numpy(background), "foreground": torch.from_numpy(foreground),
                "case_ids": ids, "step": step}


class SegmentationLoader(_Loader):
    """Image + label crops for supervised fine-tuning, with foreground oversampling.

    Iterating yields, per step, ``{"image": int16 (N, 1, D, H, W) HU, "label": uint8 (N, 1, D, H, W),
    "case_ids": [id] * N, "step": int}`` without end. Cases are drawn uniformly from ``case_ids``.
    Each crop is, with probability ``foreground_ratio``, centred on a random voxel of a random class
    present in the case (``CaseInfo.label_classes``), kept inside the array where it fits; otherwise
    it is uniform inside the body box. Labels are padded with 0.

    Arguments as :class:`PretrainLoader`, plus ``case_ids`` (the training cases) and
    ``foreground_ratio`` in [0, 1].
    """

    def __init__(self, store: Store, case_ids: Sequence[str], crop_size, batch_size: int, *, seed: int,
                 foreground_ratio: float = 0.33, rank: int = 0, world_size: int = 1, workers: int = 0,
                 start_step: int = 0, pad_value: float = -1024, allow_padding: bool = True,
                 pin_memory: bool | None = None, prefetch: int = 2):
        super().__init__(store, list(case_ids), crop_size, batch_size, seed=seed, rank=rank,
                         world_size=world_size, workers=workers, start_step=start_step, pad_value=pad_value,
                         allow_padding=allow_padding, pin_memory=pin_memory, prefetch=prefetch)
        labelled = store.index.rows["labelled"][self.rows]
        unlabelled = [store.index.info(r).id for r in self.rows[~labelled][:3]]
        if unlabelled:
            raise VolumeFusionError(
                f"{store.path}: {int((~labelled).sum())} cases have no label (e.g. {unlabelled}); fine-tuning "
                "needs a labelled store: prepare a dataset with labels (dataset.json, imagesTr, labelsTr)")
        if not 0 <= foreground_ratio <= 1:
            raise VolumeFusionError(f"foreground_ratio {foreground_ratio}: must be in [0, 1]")
        self.foreground_ratio = float(foreground_ratio)

    def _foreground_voxels(self, arrays: _Arrays, index: int) -> dict[int, np.ndarray]:
        """Up to FOREGROUND_SAMPLES ``(z, y, x)`` positions per present class of case ``index``.

        Computed once per process and case from the whole label; the subsample depends only on the
        seed and the case, so every worker and every resumed run sees the same positions.
        """
        record = self._case(index)
        if record.id not in arrays.foreground:
            flat = arrays.label(record.id).read().ravel()
            where = np.flatnonzero(flat)
            values = flat[where]
            order = np.argsort(values, kind="stable")
            where, values = where[order], values[order]
            rng = np.random.default_rng([self.seed, 0x5E6, index])
            voxels = {}
            for cls in record.label_classes:
                lo, hi = np.searchsorted(values, [cls, cls + 1])
                if hi > lo:
                    picked = where[lo:hi]
                    if hi - lo > FOREGROUND_SAMPLES:
                        picked = np.sort(rng.choice(picked, FOREGROUND_SAMPLES, replace=False))
                    zyx = np.unravel_index(picked, record.shape)
                    voxels[int(cls)] = np.stack(zyx, axis=1).astype(np.int32)
            arrays.foreground[record.id] = voxels
        return arrays.foreground[record.id]

    def batch(self, step: int, arrays: _Arrays) -> dict:
        rng = _step_rng(self.seed, self.rank, step)
        n = self.batch_size
        image = np.empty((n, 1, *self.crop), dtype=np.int16)
        label = np.empty((n, 1, *self.crop), dtype=np.uint8)
        ids = []
        for i in range(n):
            index = int(rng.integers(len(self.rows)))
            record = self._case(index)
            start = None
            if rng.random() < self.foreground_ratio:
                voxels = self._foreground_voxels(arrays, index)
                if voxels:
                    positions = voxels[sorted(voxels)[int(rng.integers(len(voxels)))]]
                    centre = positions[int(rng.integers(len(positions)))]
                    start = [_clamp_start(int(c) - k // 2, size, k)
                             for c, size, k in zip(centre, record.shape, self.crop)]
            if start is None:
                start = self._uniform_crop_start(rng, record)
            self._crop_image(arrays, record, start, image[i, 0])
            _read_crop(arrays.label(record.id), record.shape, start, label[i, 0], 0)
            ids.append(record.id)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "case_ids": ids,
                "step": step}
