"""Crop loaders: how many ``[64, 128, 128]`` crops per second reach the training loop.

Phantom CT volumes (:mod:`volumefusion.data.phantoms`, full size: 6 of ``[160, 256, 256]``) are
written as ``.nii.gz`` and prepared into a store. Then:

* :class:`~volumefusion.data.sampling.PretrainLoader`, batch 4 (each sample a background and a
  foreground crop, so 8 crops per batch), with 1 worker process and with N = min(4, CPU count);
  on ``--device cuda`` every batch is also copied to the GPU from pinned memory;
* :class:`~volumefusion.data.sampling.SegmentationLoader` (image + label crops, a third of them
  foreground-centred) with 1 worker;
* the reference approach: decode the whole source ``.nii.gz`` per crop, then cut the crop, in 1 and
  in N processes;
* the CPU time per crop of the pretraining loader in the calling process (``workers=0``): unlike
  crops/s it does not depend on what else runs on the machine;
* the store's size on disk against the source files.

The page cache is warm (the store fits in memory here); ``benchmarks/store.py`` measures cold reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from volumefusion.data.phantoms import write_msd_dataset
from volumefusion.data.prepare import prepare
from volumefusion.data.sampling import PretrainLoader, SegmentationLoader
from volumefusion.data.store import Store
from volumefusion.io import read_image
from volumefusion.preprocess import PrepareSettings

REFERENCE = "decode the source .nii.gz per crop (reference)"


def _loader_crops_per_s(loader, crops_per_batch: int, batches: int, device: str) -> float:
    """Crops/s over ``batches`` batches, after two warm-up batches (worker start, first file opens)."""
    stream = iter(loader)
    for _ in itertools.islice(stream, 2):
        pass
    start = time.perf_counter()
    for batch in itertools.islice(stream, batches):
        if device.startswith("cuda"):
            for value in batch.values():
                if torch.is_tensor(value):
                    value.to(device, non_blocking=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = batches * crops_per_batch / (time.perf_counter() - start)
    del stream  # stops the worker processes
    return rate


def _cpu_ms_per_crop(loader, crops_per_batch: int, batches: int) -> float:
    """CPU time of this process per crop, for a ``workers=0`` loader (after one warm-up batch)."""
    stream = iter(loader)
    next(stream)
    start = time.process_time()
    for _ in itertools.islice(stream, batches):
        pass
    return 1000 * (time.process_time() - start) / (batches * crops_per_batch)


def _reference_crops_per_s(args) -> float:
    """One process: decode a random source file per crop, cut a random crop; returns crops/s."""
    sources, crop, count, seed = args
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(count):
        array, _ = read_image(sources[int(rng.integers(len(sources)))])
        corner = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(array.shape, crop)]
        array[tuple(slice(a, a + c) for a, c in zip(corner, crop))].copy()
    return count / (time.perf_counter() - start)


def _size_mb(paths) -> float:
    files = [f for p in map(Path, paths) for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def _figure(name, value, unit, *, baseline=None, baseline_name=None, higher=True, device="cpu", **params):
    ratio = None
    if baseline:
        ratio = round(value / baseline if higher else baseline / value, 3)
    return {"name": name, "value": round(value, 3), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 3), "baseline_name": baseline_name,
            "ratio": ratio, "higher_is_better": higher, "device": device, "params": params}


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    """Figures: pretraining loader crops/s (1 and N workers) and CPU ms per crop, segmentation loader
    crops/s, the reference decode-per-crop rate (1 and N processes), store and source sizes on disk."""
    shape = (24, 48, 48) if tiny else (160, 256, 256)
    crop = (16, 32, 32) if tiny else (64, 128, 128)
    cases = 2 if tiny else 6
    batch_size = 2 if tiny else 4
    batches = 3 if tiny else 40
    reference_count = 2 if tiny else 6
    workers = max(2, min(4, os.cpu_count() or 1))
    common = {"cases": cases, "case_shape": list(shape), "crop": list(crop), "batch_size": batch_size}
    results = []
    with tempfile.TemporaryDirectory(prefix="vf-loader-bench-") as tmp:
        tmp = Path(tmp)
        dataset = write_msd_dataset(tmp / "raw", seeds=range(cases), shape=shape)
        summary = prepare([str(dataset)], tmp / "store", PrepareSettings())
        if not summary.ok:
            raise RuntimeError(summary.format())
        store = Store.open(tmp / "store")
        sources = sorted((dataset / "imagesTr").glob("*.nii.gz"))

        reference_one = _reference_crops_per_s((sources, crop, reference_count, 0))
        # fork where it is safe (as the DataLoader does on Linux): no re-import of torch per process
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with context.Pool(workers) as pool:
            jobs = [(sources, crop, reference_count, 1 + w) for w in range(workers)]
            rates = pool.map(_reference_crops_per_s, jobs)
        reference_n = sum(rates)
        results.append(_figure("reference_crops_per_s", reference_one, "crops/s", device=device, workers=1,
                               **common))
        results.append(_figure("reference_crops_per_s", reference_n, "crops/s", device=device,
                               workers=workers, **common))

        for n, baseline in ((1, reference_one), (workers, reference_n)):
            loader = PretrainLoader(store, crop, batch_size, seed=0, workers=n, pad_value=-1024)
            rate = _loader_crops_per_s(loader, 2 * batch_size, batches, device)
            results.append(_figure("pretrain_loader_crops_per_s", rate, "crops/s", baseline=baseline,
                                   baseline_name=REFERENCE, device=device, workers=n,
                                   pin_memory=loader.pin_memory, **common))
            results.append(_figure("pretrain_loader_crops_per_s_per_worker", rate / n, "crops/s",
                                   baseline=baseline / n, baseline_name=REFERENCE + ", per process",
                                   device=device, workers=n, **common))

        loader = PretrainLoader(store, crop, batch_size, seed=1, workers=0)
        cpu_ms = _cpu_ms_per_crop(loader, 2 * batch_size, batches)
        results.append(_figure("pretrain_loader_cpu_ms_per_crop", cpu_ms, "ms", higher=False, device=device,
                               workers=0, **common))

        ids = store.ids
        loader = SegmentationLoader(store, ids, crop, batch_size, seed=0, workers=1)
        # first pass over the cases' labels (foreground positions) happens inside the timing on purpose:
        # it is part of what a fine-tuning run pays
        rate = _loader_crops_per_s(loader, batch_size, batches, device)
        results.append(_figure("segmentation_loader_crops_per_s", rate, "crops/s", baseline=reference_one,
                               baseline_name=REFERENCE, device=device, workers=1,
                               foreground_ratio=loader.foreground_ratio, **common))

        raw_mb = int(store.index.rows["shape"].prod(axis=1).sum()) * 2 / 1e6
        results.append(_figure("store_disk", _size_mb([tmp / "store"]), "MB",
                               baseline=_size_mb([dataset / "imagesTr", dataset / "labelsTr"]),
                               baseline_name="source .nii.gz images and labels", higher=False, device=device,
                               uncompressed_int16_mb=round(raw_mb, 1), includes_labels=True, **common))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes that finish in seconds")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to copy batches to the GPU (pinned)")
    args = parser.parse_args()
    print(json.dumps(run(tiny=args.tiny, device=args.device), indent=1))
