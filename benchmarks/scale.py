"""Store start-up at scale: opening a store of 10k, 100k and 1M cases, per process, cold and warm.

A few real cases (phantom CT, ``[80, 192, 192]``) are prepared into a store; the store is then grown
to N cases by writing N case records, copies of the real ones under new ids, whose ``arrays/<id>``
folders are symbolic links to a real case's arrays (crops read real bytes). Above
``RECORDS_UP_TO`` cases the records are not written: the index is written directly from the real
rows (what ``prepare`` would have merged), so opening, loaders and sampling are measured but
rebuilding the index from records and the per-record baseline are not.

Each open is measured in a fresh process (``python -m benchmarks.scale --probe``), after imports:
*cold* drops the index file and ``store.json`` from the page cache first (``posix_fadvise``
DONTNEED; no root needed, and it leaves other processes' caches alone; directory and inode caches
stay warm) and, for the baseline, every record file; *warm* runs again with everything cached. The
baseline is how the store opened before the index: read and parse every ``cases/<id>.json``
(the code of ``Store.open`` before the index, repeated here). ``Store.open`` maps the index without
reading its rows; ``open_and_read_index`` adds the first pass over every row (the whole file read
from disk when cold), which a loader pays later, spread over its first draws.

In the same process, after a warm open: the process's growth in resident memory (RSS, which counts
the memory-mapped index pages the process touched although every process on the machine shares
them through the page cache; ``anonymous_mb`` is the part that is the process's own), the start-up
of a pretraining loader with N workers (to its first batch), the time to draw 10k crop positions
(case and start, no reading; baseline: the same draws from the list of records the loader held
before the index), and crops/s read through the loader against the same loader on a store of only
the real cases (which keeps every case's arrays open: a large store opens a case's arrays on almost
every draw, with or without the index). ``prepare --reindex`` is timed from scratch (no index:
every record read) and on a current index (every record ``stat``-ed, none read).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.store import _drop_cache
from volumefusion.data.index import INDEX_FILE, row_dtype, update_index
from volumefusion.data.phantoms import write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.preprocess import PrepareSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS_UP_TO = 100_000
"""Largest store whose case records are written; larger ones get their index written directly."""
REAL_CASES = 4
CASE_SHAPE = (80, 192, 192)
CROP = (64, 128, 128)
POSITIONS = 10_000


def _figure(name, value, unit, *, baseline=None, baseline_name=None, higher=False, **params):
    value, baseline = float(f"{value:.4g}"), baseline and float(f"{baseline:.4g}")
    ratio = None
    if baseline:
        ratio = round(value / baseline if higher else baseline / value, 3)
    return {"name": name, "value": value, "unit": unit, "baseline": baseline,
            "baseline_name": baseline_name if baseline else None, "ratio": ratio, "higher_is_better": higher,
            "device": "cpu", "params": params}


# --------------------------------------------------------------------------------------------- stores


def real_store(root: Path) -> Path:
    """A store of REAL_CASES prepared phantoms."""
    raw = write_phantoms(root / "raw", seeds=range(REAL_CASES), shape=CASE_SHAPE)
    summary = prepare([str(p) for p in raw], root / "real", PrepareSettings())
    if not summary.ok:
        raise RuntimeError(summary.format())
    return root / "real"


def grow(real: Path, out: Path, count: int) -> None:
    """A store of ``count`` cases whose records copy the real ones and whose arrays link to theirs."""
    templates = sorted((real / "cases").glob("*.json"))
    (out / "cases").mkdir(parents=True)
    shutil.copy(real / "store.json", out / "store.json")
    for template in templates:
        shutil.copytree(real / "arrays" / template.stem, out / "arrays" / f"real_{template.stem}")
    texts = [t.read_text() for t in templates]
    ids = [t.stem for t in templates]
    cases, arrays = out / "cases", out / "arrays"
    write_records = count <= RECORDS_UP_TO
    for i in range(count):
        k = i % len(texts)
        case_id = f"case_{i:07d}"
        os.symlink(f"real_{ids[k]}", arrays / case_id)
        if write_records:
            with open(cases / f"{case_id}.json", "w") as f:
                f.write(texts[k].replace(f'"id": "{ids[k]}"', f'"id": "{case_id}"', 1))
    if write_records:
        return
    real_rows = update_index(real).rows
    rows = np.zeros(count, row_dtype(len("case_0000000"), real_rows.dtype["checksum"].itemsize))
    for name in ("shape", "spacing_zyx", "body_box", "labelled", "classes", "checksum"):
        rows[name] = real_rows[name][np.arange(count) % len(real_rows)]
    rows["id"] = np.char.add(b"case_", np.char.zfill(np.arange(count).astype("S7"), 7))
    from volumefusion.data.index import _stable_stamp, _write_index_file

    _write_index_file(out / INDEX_FILE, rows, _stable_stamp(out))


# --------------------------------------------------------------------------------------------- probe


def _memory_mb() -> tuple[float, float]:
    """(RSS, anonymous memory) of this process in MB: the RSS less the file pages it maps (the
    index's pages, which every process on the machine shares through the page cache)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Rss"] / 1024, fields["Anonymous"] / 1024


def _open_per_record(path: Path) -> list:
    """How ``Store.open`` read a store before the index: every record file, parsed."""
    from volumefusion.data.store import CaseRecord

    cases = [CaseRecord.from_dict(json.loads(f.read_text())) for f in sorted((path / "cases").glob("*.json"))
             if not f.name.startswith(".")]
    cases.sort(key=lambda c: c.id)
    return cases


def probe(path: Path, mode: str, cold: bool, workers: int, crops: int) -> dict:
    """Measurements of one fresh process (see the module docstring); ``mode``: index or records."""
    import torch

    from volumefusion.data.sampling import PretrainLoader
    from volumefusion.data.store import Store

    torch.set_num_threads(1)
    if cold:
        files = [path / "store.json"]
        files += [path / INDEX_FILE] if mode == "index" else list((path / "cases").glob("*.json"))
        _drop_cache(files)
    rss0, anonymous0 = _memory_mb()
    start = time.perf_counter()
    opened = Store.open(path) if mode == "index" else _open_per_record(path)
    result = {"open_s": time.perf_counter() - start}
    rss1, _ = _memory_mb()
    result["open_rss_mb"] = rss1 - rss0
    if mode == "index":  # the rows are read from the file when first touched: here, all of them
        start = time.perf_counter()
        opened.index.rows["body_box"].sum()
        result["read_rows_s"] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    if mode != "index":  # the loader before the index: a list of records, their tuples
        from volumefusion.data.sampling import _uniform_start

        start = time.perf_counter()
        for _ in range(POSITIONS):
            record = opened[int(rng.integers(len(opened)))]
            [_uniform_start(rng, box, size, c) for box, size, c in zip(record.body_box, record.shape, CROP)]
        result["positions_s"] = time.perf_counter() - start
        return result
    start = time.perf_counter()
    loader = PretrainLoader(opened, CROP, 2, seed=0, workers=workers, pin_memory=False)
    stream = iter(loader)
    next(stream)
    result["loader_start_s"] = time.perf_counter() - start
    del stream
    start = time.perf_counter()
    for _ in range(POSITIONS):
        loader._uniform_crop_start(rng, loader._case(int(rng.integers(len(loader.rows)))))
    result["positions_s"] = time.perf_counter() - start
    rss2, anonymous2 = _memory_mb()
    result.update(rss_mb=rss2 - rss0, anonymous_mb=anonymous2 - anonymous0)
    if crops:
        serial = iter(PretrainLoader(opened, CROP, 2, seed=1, workers=0, pin_memory=False))
        next(serial)
        start = time.perf_counter()
        for _ in range(crops // 4):
            next(serial)
        result["crops_per_s"] = (crops // 4) * 4 / (time.perf_counter() - start)
    return result


def _probe(path: Path, mode: str, cold: bool, workers: int = 0, crops: int = 0) -> dict:
    """:func:`probe` in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.scale", "--probe", str(path), "--mode", mode,
               "--workers", str(workers), "--crops", str(crops)] + (["--cold"] if cold else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- run


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    """Figures per store size: open cold/warm (vs per-record), memory, loader start-up, positions,
    crops/s, reindex."""
    sizes = (500,) if tiny else (10_000, 100_000, 1_000_000)
    workers = 2 if tiny else max(2, min(4, os.cpu_count() or 1))
    crops = 8 if tiny else 200
    results = []
    with tempfile.TemporaryDirectory(prefix="vf-scale-bench-") as tmp:
        tmp = Path(tmp)
        real = real_store(tmp)
        reference = _probe(real, "index", cold=False, crops=crops)["crops_per_s"]
        for count in sizes:
            store = tmp / f"store{count}"
            start = time.perf_counter()
            grow(real, store, count)
            records = count <= RECORDS_UP_TO
            common = {"cases": count, "records_written": records, "simulate_s": round(time.perf_counter() - start, 1)}
            if records:
                start = time.perf_counter()
                update_index(store)
                scratch = time.perf_counter() - start
                start = time.perf_counter()
                update_index(store, full=True)  # what `prepare --reindex` does on a current index
                current = time.perf_counter() - start
                results.append(_figure("reindex_from_scratch_s", scratch, "s", **common))
                results.append(_figure("reindex_current_s", current, "s", **common))
            base = {}
            for cold in (True, False):
                mode = "cold" if cold else "warm"
                if records:
                    base[mode] = _probe(store, "records", cold)
                figures = _probe(store, "index", cold, workers=workers, crops=0 if cold else crops)
                old = base.get(mode, {})
                results.append(_figure(f"open_{mode}_s", figures["open_s"], "s", baseline=old.get("open_s"),
                                       baseline_name="read every case record (Store.open before the index)",
                                       **common))
                results.append(_figure(f"open_and_read_index_{mode}_s", figures["open_s"] + figures["read_rows_s"],
                                       "s", baseline=old.get("open_s"),
                                       baseline_name="read every case record (Store.open before the index)",
                                       index_mb=round((store / INDEX_FILE).stat().st_size / 1e6, 1), **common))
            results.append(_figure("rss_growth_mb", figures["rss_mb"], "MB", baseline=old.get("open_rss_mb"),
                                   baseline_name="read every case record (Store.open before the index)",
                                   anonymous_mb=round(figures["anonymous_mb"], 1),
                                   open_only_rss_mb=round(figures["open_rss_mb"], 1), **common))
            results.append(_figure("loader_start_s", figures["loader_start_s"], "s", workers=workers, **common))
            results.append(_figure("positions_10k_s", figures["positions_s"], "s", baseline=old.get("positions_s"),
                                   baseline_name="the loader's list of case records (before the index)",
                                   positions=POSITIONS, **common))
            results.append(_figure("crops_per_s", figures["crops_per_s"], "crops/s", baseline=reference,
                                   baseline_name=f"same loader on a store of the {REAL_CASES} real cases",
                                   higher=True, crop=list(CROP), case_shape=list(CASE_SHAPE), **common))
            shutil.rmtree(store)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes that finish in seconds")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="index", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--crops", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.mode, args.cold, args.workers, args.crops)))
    else:
        print(json.dumps(run(tiny=args.tiny), indent=1))
