"""Store formats and crop-read speed: why the store holds blosc2 arrays, and how fast crops come out.

Synthetic CT (body with fat, soft tissue, lungs and bone, 15 HU noise, air and an outside-FOV
circle) is written as ``.nii.gz``, prepared into a store, and copied into each candidate format:

* ``npy``: uncompressed ``.npy``, memory-mapped;
* ``blosc2_*``: blosc2 NDArrays with the codec, chunks and blocks in the name (see
  :data:`BLOSC2_CANDIDATES`; no ``b...`` part: blosc2's default blocks);
* ``zarr``: zarr v3, chunks 32x128x128, blosc ZSTD + bit shuffle;
* ``store``: the store's own arrays (LZ4HC + bit shuffle, chunks 32x128x128, blocks 8x32x32).

Each format is timed on random ``[64, 128, 128]`` crops from random cases, *cold*
(``posix_fadvise(DONTNEED)`` drops the case's pages from the page cache before every crop, so each
crop reads from disk) and *warm* (page cache full). Then the store API (``Store.image(id)[...]``)
with 1 and N worker processes, cold, against the reference approach: decode the whole source
``.nii.gz`` per sample, then crop. Compression ratios depend on content: real CT with padding
outside the field of view compresses better than this noise-dominated phantom.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from volumefusion.data.prepare import prepare
from volumefusion.data.store import Store
from volumefusion.io import Geometry, read_image, write_image
from volumefusion.preprocess import PrepareSettings


def synthetic_ct(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """int16 HU ``(z, y, x)`` with CT-like structures and noise (a few seconds for 200x512x512)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    cy, cx = y / 2, x / 2
    r2 = ((yy - cy) / (0.38 * y)) ** 2 + ((xx - cx) / (0.45 * x)) ** 2
    fat, soft = r2 < 1, r2 < 0.8
    lungs = (((yy - cy * 0.95) / (0.22 * y)) ** 2 + ((np.abs(xx - cx) - 0.2 * x) / (0.13 * x)) ** 2) < 1
    spine = ((yy - cy * 1.45) ** 2 + (xx - cx) ** 2) < (0.05 * x) ** 2
    ribs = (np.abs(np.sqrt(r2) - 0.85) < 0.03) & (np.sin(np.arctan2(yy - cy, xx - cx) * 9) > 0.3)
    fov = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.5 * min(y, x)) ** 2
    plane = np.full((y, x), -1000.0, np.float32)
    plane[fat] = -100
    plane[soft] = 40
    plane[lungs & soft] = -850
    plane[(spine | ribs) & fat] = 700

    def smooth(n: int) -> np.ndarray:  # slow variation along one axis
        return np.interp(np.arange(n), np.linspace(0, n, 8), rng.normal(size=8)).astype(np.float32)

    field = smooth(z)[:, None, None] + smooth(y)[None, :, None] * smooth(x)[None, None, :]
    volume = rng.standard_normal(shape, dtype=np.float32)
    volume *= 15  # HU noise
    volume += plane
    volume += 30 * field * soft
    volume[:, ~fov] = -2048
    return np.clip(volume, -2048, 3071).astype(np.int16)


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def _size_mb(paths: list[Path]) -> float:
    return sum(f.stat().st_size for p in paths for f in _files(p)) / 1e6


def _corner(rng: np.random.Generator, shape, crop) -> tuple[slice, ...]:
    starts = [int(rng.integers(0, max(1, s - c + 1))) for s, c in zip(shape, crop)]
    return tuple(slice(a, a + c) for a, c in zip(starts, crop))


def _open_reader(fmt: str, path: Path):
    if fmt == "npy":
        return np.load(path, mmap_mode="r")
    if fmt == "zarr":
        import zarr

        return zarr.open_array(str(path), mode="r")
    import blosc2

    return blosc2.open(str(path), mode="r", dparams={"nthreads": 1})


# name -> (codec, filter, chunks, blocks or None for blosc2's default); "store" is written by prepare
BLOSC2_CANDIDATES = {
    "blosc2_zstd_c32x64x64": ("ZSTD", "BITSHUFFLE", (32, 64, 64), None),
    "blosc2_zstd_c64x128x128": ("ZSTD", "BITSHUFFLE", (64, 128, 128), None),
    "blosc2_zstd_c32x128x128_b8x32x32": ("ZSTD", "BITSHUFFLE", (32, 128, 128), (8, 32, 32)),
    "blosc2_lz4_shuffle_c32x128x128_b8x32x32": ("LZ4", "SHUFFLE", (32, 128, 128), (8, 32, 32)),
}


def _write_candidate(fmt: str, path: Path, array: np.ndarray) -> None:
    import blosc2

    if fmt == "npy":
        np.save(path, array)
    elif fmt == "zarr":
        import zarr
        from zarr.codecs import BloscCodec

        out = zarr.create_array(str(path), shape=array.shape, dtype=array.dtype, chunks=(32, 128, 128),
                                compressors=BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"))
        out[...] = array
    else:
        codec, shuffle, chunks, blocks = BLOSC2_CANDIDATES[fmt]
        cparams = {"codec": blosc2.Codec[codec], "clevel": 5, "filters": [blosc2.Filter[shuffle]],
                   "nthreads": 1}
        chunks = tuple(min(c, s) for c, s in zip(chunks, array.shape))
        layout = {"chunks": chunks} if blocks is None else {
            "chunks": chunks, "blocks": tuple(min(b, c) for b, c in zip(blocks, chunks))}
        blosc2.asarray(array, urlpath=str(path), mode="w", cparams=cparams, **layout)


def _rates(count: int, wall: float, cpu: float) -> tuple[float, float]:
    return count / wall, count / max(cpu, 1e-9)


def _crops_per_s(fmt: str, paths: list[Path], crop, count: int, cold: bool, seed: int) -> tuple[float, float]:
    """Random crops from random cases, each opening its case afresh as a loader worker does.

    Returns crops per wall-clock second and per CPU second of this process.
    """
    rng = np.random.default_rng(seed)
    shapes = [_open_reader(fmt, p).shape for p in paths]
    files = [_files(p) for p in paths]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        i = int(rng.integers(len(paths)))
        if cold:
            _drop_cache(files[i])
        np.asarray(_open_reader(fmt, paths[i])[_corner(rng, shapes[i], crop)])
    return _rates(count, time.perf_counter() - wall, time.process_time() - cpu)


def _store_worker(args) -> tuple[float, float]:
    """One loader-like process: cold crops through the Store API; crops per wall / CPU second."""
    store_path, crop, count, seed = args
    store = Store.open(store_path)
    rng = np.random.default_rng(seed)
    store.image(store.ids[0])[:1, :1, :1]  # imports and first open outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        record = store.index.info(int(rng.integers(len(store))))
        image = store.image(record.id)
        _drop_cache([image.path])
        image[_corner(rng, record.shape, crop)]
    return _rates(count, time.perf_counter() - wall, time.process_time() - cpu)


def _decode_per_sample(sources: list[Path], crop, count: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        path = sources[int(rng.integers(len(sources)))]
        _drop_cache([path])
        array, _ = read_image(path)
        array[_corner(rng, array.shape, crop)].copy()
    return _rates(count, time.perf_counter() - wall, time.process_time() - cpu)


def _figure(name, value, unit, *, baseline=None, baseline_name=None, higher=True, device="cpu", **params):
    ratio = None
    if baseline:
        ratio = round(value / baseline if higher else baseline / value, 3)
    return {"name": name, "value": round(value, 3), "unit": unit, "baseline": baseline and round(baseline, 3),
            "baseline_name": baseline_name, "ratio": ratio, "higher_is_better": higher, "device": device,
            "params": params}


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    """Figures: candidate formats (disk MB, cold/warm crops/s), store API with 1 and N workers, vs .nii.gz.

    Crop rates are per wall-clock second; ``params.cpu_crops_per_s`` gives the same per CPU second
    (what one unshared core delivers) and ``params.load_avg`` the machine's load while measuring.
    """
    shape = (24, 96, 96) if tiny else (200, 512, 512)
    crop = (16, 32, 32) if tiny else (64, 128, 128)
    cases = 2 if tiny else 5
    crops = 20 if tiny else 150
    workers = 2 if tiny else max(2, min(4, os.cpu_count() or 1))
    common = {"cases": cases, "case_shape": list(shape), "crop": list(crop)}
    results = []

    def rate_figure(name, rates, **params):
        wall, cpu = rates
        load = round(os.getloadavg()[0], 1)
        params = {**common, **params, "cpu_crops_per_s": round(cpu, 1), "load_avg": load}
        return _figure(name, wall, "crops/s", **params)

    with tempfile.TemporaryDirectory(prefix="vf-store-bench-") as tmp:
        tmp = Path(tmp)
        geometry = Geometry(shape, (1.5, 0.7, 0.7), (0.0, 0.0, 0.0))
        sources = []
        for i in range(cases):
            sources.append(tmp / "raw" / f"ct{i}.nii.gz")
            write_image(sources[-1], synthetic_ct(shape, i), geometry)
        wall, cpu = time.perf_counter(), time.process_time()
        summary = prepare([str(tmp / "raw")], tmp / "store", PrepareSettings())
        if not summary.ok:
            raise RuntimeError(summary.format())
        results.append(_figure("prepare_s_per_case", (time.perf_counter() - wall) / cases, "s", higher=False,
                               cpu_s_per_case=round((time.process_time() - cpu) / cases, 2), **common))
        store = Store.open(tmp / "store")
        prepared = [store.image(i).read() for i in store.ids]
        raw_mb = sum(a.nbytes for a in prepared) / 1e6

        for fmt in ("npy", *BLOSC2_CANDIDATES, "zarr", "store"):
            if fmt == "store":
                paths = [store.image(i).path for i in store.ids]
            else:
                suffix = {"npy": ".npy", "zarr": ".zarr"}.get(fmt, ".b2nd")
                paths = [tmp / fmt / f"case{i}{suffix}" for i in range(cases)]
                paths[0].parent.mkdir(parents=True, exist_ok=True)
                for path, array in zip(paths, prepared):
                    _write_candidate(fmt, path, array)
            results.append(_figure(f"{fmt}_disk", _size_mb(paths), "MB", baseline=raw_mb,
                                   baseline_name="uncompressed int16", higher=False, **common))
            for cold in (True, False):
                rates = _crops_per_s(fmt, paths, crop, crops, cold, seed=1)
                results.append(rate_figure(f"{fmt}_crops_per_s_{'cold' if cold else 'warm'}", rates))

        reference, _ = _decode_per_sample(sources, crop, 2 if tiny else 4, seed=2)
        versus = {"baseline": reference, "baseline_name": "decode the source .nii.gz per sample (reference)"}
        results.append(rate_figure("store_api_crops_per_s_per_worker", _store_worker(
            (str(tmp / "store"), crop, crops, 3)), workers=1, **versus))
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            jobs = [(str(tmp / "store"), crop, crops, 10 + w) for w in range(workers)]
            rates = pool.map(_store_worker, jobs)
        total = (sum(r[0] for r in rates), sum(r[1] for r in rates))
        results.append(rate_figure("store_api_crops_per_s_total", total, workers=workers, **versus))
        per_worker = (total[0] / workers, total[1] / workers)
        results.append(rate_figure("store_api_crops_per_s_per_worker", per_worker, workers=workers, **versus))
        results.append(_figure("store_total_disk", _size_mb([tmp / "store"]), "MB",
                               baseline=_size_mb(sources), baseline_name="source .nii.gz files", higher=False,
                               **common))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes that finish in seconds")
    parser.add_argument("--device", default="cpu", help="recorded only; the store is read on the CPU")
    args = parser.parse_args()
    print(json.dumps(run(tiny=args.tiny, device=args.device), indent=1))
