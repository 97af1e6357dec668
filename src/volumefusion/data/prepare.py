"""Raw CT -> store: the batch runner of ``volumefusion prepare``.

Finds the cases (:mod:`volumefusion.data.datasets`), skips those already prepared from the same
source version, runs :func:`~volumefusion.preprocess.preprocess_case` on the rest in worker
processes and writes them with :func:`~volumefusion.data.store.write_case`. Bad inputs are
reported and skipped; the other cases go on.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError
from volumefusion.data.datasets import CaseTask, absolute_source, collect_cases
from volumefusion.data.index import update_index
from volumefusion.data.store import (
    STORE_ENTRIES,
    CaseRecord,
    case_problem,
    init_store,
    name_found_labels,
    read_record,
    remove_killed_writers_folders,
    write_case,
)
from volumefusion.files import check_writable_folder, missing_reason
from volumefusion.geometry import Geometry
from volumefusion.io import SERIES_SEPARATOR, read_image
from volumefusion.log import get_logger, progress
from volumefusion.preprocess import PrepareSettings, preprocess_case, suspicious_values
from volumefusion.processes import worker_pool

log = get_logger(__name__)


@dataclass
class PrepareSummary:
    """What a ``prepare`` run did. ``failed`` holds ``(input, reason)``; the reason names the file."""

    store: Path
    shard: tuple[int, int] = (0, 1)
    total: int = 0
    prepared: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    """suspicious values in cases that were prepared anyway, each naming the file."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        shard = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard[1] > 1 else ""
        lines = [
            f"{self.store}{shard}: {self.total} cases: {len(self.prepared)} prepared, "
            f"{len(self.skipped)} already done, {len(self.failed)} failed"
            + (f", {len(self.warnings)} warning(s)" if self.warnings else "") + f" ({self.seconds:.1f} s)"
        ]
        lines += [f"  FAILED {reason}" for _, reason in self.failed]
        lines += [f"  WARNING {warning}" for warning in self.warnings]
        return "\n".join(lines)


def shard_of(case_id: str, count: int) -> int:
    """Which of ``count`` shards prepares ``case_id``: a stable hash, so every shard agrees."""
    return int(hashlib.sha1(case_id.encode()).hexdigest()[:12], 16) % count


def _grid_difference(image: Geometry, label: Geometry) -> str | None:
    """How the label grid differs from the image grid, or None if they match (to header precision)."""
    def text(values):
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    tolerance = 1e-2 * min(image.spacing_zyx)  # mm; headers may store float32: demand closeness only
    checks = [
        ("shape_zyx", image.shape_zyx == label.shape_zyx),
        ("spacing_zyx", np.allclose(image.spacing_zyx, label.spacing_zyx, rtol=1e-4, atol=0)),
        ("origin", np.allclose(image.origin, label.origin, rtol=0, atol=tolerance)),
        ("direction", np.allclose(image.direction, label.direction, rtol=0, atol=1e-4)),
    ]
    for name, same in checks:
        if not same:
            return f"{name} {text(getattr(label, name))} vs the image's {text(getattr(image, name))}"
    return None


def source_version(path: str) -> dict:
    """What identifies the version of a source on disk, to notice a file replaced in place.

    For an image file ``{"size": bytes, "mtime_ns": int}``; for a DICOM series folder (``path`` may
    carry a ``::UID``) ``{"files": count, "size": total bytes, "mtime_ns": newest}`` of its visible
    files. (The data file beside a ``.mhd``/``.nhdr`` header is not covered.)
    Raises OSError if the source is missing.
    """
    location = Path(path.rsplit(SERIES_SEPARATOR, 1)[0] if SERIES_SEPARATOR in path else path)
    if not location.is_dir():
        stat = location.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stats = [e.stat() for e in os.scandir(location) if e.is_file() and not e.name.startswith(".")]
    return {"files": len(stats), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _task_version(task: CaseTask) -> dict:
    """``{"image": version, "label": version or None}`` of a task's sources (see :func:`source_version`)."""
    return {"image": source_version(task.image),
            "label": None if task.label is None else source_version(task.label)}


def _source_changed(record: CaseRecord, task: CaseTask) -> bool:
    """Whether a stored case's sources differ from the version it was prepared from. Records written
    before versions were recorded have none and count as unchanged."""
    recorded = record.source_version
    if not recorded:
        return False
    try:
        return _task_version(task) != recorded
    except OSError:
        return True  # gone since discovery: preparing it again reports the problem


def _plan(record: CaseRecord | None, task: CaseTask, store: str | Path) -> tuple[str, str]:
    """What to do with ``task`` given the store's record of its case id (None: not prepared):
    ``("write", why)``, ``("skip", "")`` when the record is of the same sources, unchanged, or
    ``("duplicate", the failure reason)`` when it holds another image under the same id."""
    source = absolute_source(task.image)
    label_source = None if task.label is None else absolute_source(task.label)
    if record is None:
        return "write", ""
    if record.source != source:
        return "duplicate", (f"{task.image}: duplicate case id {task.case_id!r}: the store already holds it from "
                             f"{record.source}; rename the file, or delete {store}/cases/{task.case_id}.json to "
                             "replace it")
    if record.channel != task.channel:
        return "write", f"prepared from channel {record.channel}, now channel {task.channel} is asked for"
    if record.label_source != label_source:
        return "write", "its label was added or changed"
    if _source_changed(record, task):
        return "write", "source changed since it was prepared"
    problem = case_problem(store, record)  # what would be skipped must be whole
    return ("write", problem) if problem else ("skip", "")


def prepare_case(task: CaseTask, store: str | Path, settings: PrepareSettings) -> tuple[bool, list[str]]:
    """Read, preprocess and store one case; VolumeFusionError (naming the file) if the input is bad,
    or if another run stored another image under the same case id meanwhile.

    Returns whether this call stored the case (False: another run stored it from the same sources
    meanwhile) and warnings about suspicious values (:func:`~volumefusion.preprocess.suspicious_values`),
    each naming the file.
    """
    # Taken before reading: a file replaced while it is read then differs on the next run.
    try:
        version = _task_version(task)
    except OSError as exc:
        problem = exc.strerror if os.path.exists(exc.filename) else missing_reason(exc.filename)
        raise VolumeFusionError(f"{exc.filename}: cannot read ({problem})") from None
    image, geometry = read_image(task.image, channel=task.channel)
    warnings = [f"{task.image}: {w}" for w in suspicious_values(image, geometry.spacing_zyx)]
    label = None
    if task.label is not None:
        label, label_geometry = read_image(task.label)
        difference = _grid_difference(geometry, label_geometry)
        if difference:
            raise VolumeFusionError(
                f"{task.label}: label grid does not match image {task.image}: {difference}"
            )
        if task.allowed_labels is not None:
            extra = sorted(set(np.unique(label).tolist()) - set(task.allowed_labels))
            if extra:
                raise VolumeFusionError(
                    f"{task.label}: label values {extra} are not in dataset.json labels {task.allowed_labels}"
                )
    try:
        prepared = preprocess_case(image, geometry, settings, label)
    except VolumeFusionError as exc:
        raise VolumeFusionError(f"{task.label or task.image}: {exc}") from None

    def still_to_write(record: CaseRecord | None) -> bool:
        # the last look, under the store's writer lock: another prepare run (or an overlapping shard)
        # may have stored this case id since this run looked
        action, reason = _plan(record, task, store)
        if action == "duplicate":
            raise VolumeFusionError(reason)
        return action == "write"

    # the record is written last, so a recorded version always belongs to the arrays beside it
    label_source = None if task.label is None else absolute_source(task.label)
    record = write_case(store, prepared, case_id=task.case_id, source=absolute_source(task.image),
                        label_source=label_source, settings=settings.to_dict(), source_version=version,
                        channel=task.channel, check=still_to_write)
    return record is not None, warnings


def _run_task(task: CaseTask, store: str, settings: PrepareSettings) -> tuple[str | None, list[str], bool]:
    """Worker entry point: ``(None, warnings, stored)`` on success (``stored``: see :func:`prepare_case`),
    else ``(the failure reason, [], False)`` (never raises for bad input)."""
    try:
        stored, warnings = prepare_case(task, store, settings)
        return None, warnings, stored
    except VolumeFusionError as exc:
        return str(exc), [], False
    except MemoryError:
        return f"{task.image}: out of memory while preparing; retry with fewer --workers", [], False
    except OSError as exc:  # the system refused: a full disk, a file that vanished, permissions
        if exc.errno == errno.ENOSPC:  # the store's place, not a temporary file in it
            return f"{task.image}: no space left on {store} ({exc.strerror})", [], False
        where = f"{exc.filename}: " if exc.filename and str(exc.filename) != task.image else ""
        return f"{task.image}: {where}{exc.strerror or exc}", [], False
    except Exception as exc:  # a bug or an exotic file must not stop the other cases
        return f"{task.image}: unexpected {type(exc).__name__}: {exc}", [], False


def _execute(tasks: list[CaseTask], store: str, settings: PrepareSettings, workers: int, on_done) -> None:
    """Run ``_run_task`` over ``tasks`` with up to ``workers`` processes (which die with this one),
    calling ``on_done(task, (error, warnings, stored))``."""
    if workers <= 1:
        for task in tasks:
            on_done(task, _run_task(task, store, settings))
        return
    pending = list(reversed(tasks))
    running: dict = {}
    pool, broken = worker_pool(workers), False
    try:
        while pending or running:
            if broken and not running:
                pool.shutdown(wait=True)
                pool, broken = worker_pool(workers), False
            while pending and not broken and len(running) < workers:
                task = pending.pop()
                running[pool.submit(_run_task, task, store, settings)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken = True
                    outcome = (f"{task.image}: a worker process died (out of memory or a crash in the image "
                               "reader) while this case was running; re-run to retry", [], False)
                on_done(task, outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_writable(out: Path) -> None:
    """VolumeFusionError unless ``out`` is a store, an empty or missing folder (then created), or a
    folder that only a starting shard has written to, and files can be created in it."""
    if out.exists() and not out.is_dir():
        raise VolumeFusionError(f"{out}: is a file; --out takes a store folder")
    if out.is_dir() and not (out / "store.json").exists():
        # a store's own entries, or hidden ones (.DS_Store, another shard's probe), are no reason to stop
        foreign = sorted(p.name for p in out.iterdir() if p.name not in STORE_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise VolumeFusionError(
                f"{out}: folder holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                "and is not a store; give --out a new or empty folder"
            )
    check_writable_folder(out, "--out")


def prepare(
    inputs: list[str],
    out: str | Path,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    channel: int | None = None,
    label_dir: str | Path | None = None,
    label_names: dict[int, str] | None = None,
) -> PrepareSummary:
    """Prepare every case named by ``inputs`` into the store ``out``; see ``volumefusion prepare --help``.

    Bad inputs are reported in the summary and skipped; finished cases are skipped unless their image
    or label file changed since (size or modification time, see :func:`source_version`); ``shard=(i, n)``
    prepares only the cases whose id hashes to ``i`` (see :func:`shard_of`), so ``n`` runs with
    ``i = 0..n-1`` fill one store with disjoint cases. ``label_names`` names the classes of label
    maps given through ``label_dir`` (datasets bring their own from ``dataset.json``); without it
    the classes found are named ``label_K`` (see :func:`~volumefusion.data.store.name_found_labels`).
    """
    settings = settings or PrepareSettings()
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise VolumeFusionError(f"shard {index}/{count}: needs 0 <= i < n, e.g. 0/4 .. 3/4")
    out = Path(out)
    start = time.perf_counter()
    check_writable(out)
    tasks, dataset_names, failures = collect_cases(inputs, channel=channel, label_dir=label_dir)
    if not tasks and not failures:
        raise VolumeFusionError(f"no images found in {' '.join(map(str, inputs))}")
    # Each input problem is reported by exactly one shard, so the shards' summaries add up.
    summary = PrepareSummary(store=out, shard=(index, count),
                             failed=[f for f in failures if shard_of(f[0], count) == index])
    if not tasks:  # every input failed: no store is made for nothing
        for _, reason in summary.failed:
            log.warning("%s", reason)
        summary.total, summary.seconds = len(summary.failed), time.perf_counter() - start
        return summary
    init_store(out, settings.to_dict(), dataset_names or label_names)
    removed, kept = remove_killed_writers_folders(out)
    if removed or kept:
        log.info("%s: removed %d temporary folder(s) of killed prepare runs on this machine%s", out, removed,
                 f"; kept {kept} of running ones or of other machines (arrays/.*.tmp)" if kept else "")
    mine = [t for t in tasks if shard_of(t.case_id, count) == index]
    summary.total = len(mine) + len(summary.failed)
    todo = []
    for task in mine:
        action, reason = _plan(read_record(out, task.case_id), task, out)
        if action == "write":
            if reason:
                log.info("%s: %s: re-preparing", task.case_id, reason)
            todo.append(task)
        elif action == "skip":
            summary.skipped.append(task.case_id)
        else:
            summary.failed.append((task.image, reason))
    for _, reason in summary.failed:
        log.warning("%s", reason)
    bar = progress(total=len(todo), desc="prepare", unit="case")
    already_failed = len(summary.failed)

    def on_done(task: CaseTask, outcome: tuple[str | None, list[str], bool]) -> None:
        error, warnings, stored = outcome
        for warning in warnings:
            log.warning("%s", warning)
        summary.warnings += warnings
        if error is None and not stored:
            log.info("%s: prepared meanwhile by another prepare run from the same sources", task.case_id)
            summary.skipped.append(task.case_id)
        elif error is None:
            summary.prepared.append(task.case_id)
            if bar.disable:  # no bar (a batch job's log file): one line per case shows progress
                done = len(summary.prepared) + len(summary.failed) - already_failed
                log.info("%s: prepared (%d of %d)", task.case_id, done, len(todo))
        else:
            summary.failed.append((task.image, error))
            log.warning("%s", error)
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed), refresh=False)

    try:
        _execute(todo, str(out), settings, workers, on_done)
    finally:
        bar.close()
    try:  # merge this run's cases into the store's index (naming found label classes reads it)
        if label_dir is not None and not (dataset_names or label_names):
            name_found_labels(out)
        else:
            update_index(out)
    except VolumeFusionError as exc:  # the cases are stored; the next Store.open rebuilds the index
        summary.failed.append((str(out), str(exc)))
        log.warning("%s", exc)
    summary.seconds = time.perf_counter() - start
    return summary
