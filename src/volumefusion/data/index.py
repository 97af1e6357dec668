"""The store's case index: one file, ``STORE/cases.index``, that lets a store of 100k cases open in
well under a second, by every DDP rank and loader worker, without touching the per-case records.

The per-case records ``cases/<id>.json`` stay the source of truth (resume, restore); the index is a
copy of what sampling and fine-tuning need from each of them, rebuilt from them when missing or stale.

File layout: the 8 bytes ``b"\\x93VFINDEX"``, a little-endian uint32 header length, a JSON header
(``{"version", "count", "id_bytes", "checksum_bytes", "stamp"}``, space-padded so the rows start at
a multiple of 64 bytes), then ``count`` rows of the NumPy structured dtype :func:`row_dtype`, sorted
by case id. Opening reads the header and memory-maps the rows: every process on a node shares one
copy in the page cache, and a forked loader worker inherits the mapping.

Staleness rule: the header's ``stamp`` is the ``st_mtime_ns`` of the ``cases/`` folder when the
index was built. Every record is written by creating a temporary file in ``cases/`` and renaming it,
and deleting a record removes an entry, so any change to the set of records changes the folder's
mtime: checking one ``stat`` of ``cases/`` against the stamp detects it, with no per-case operation.
The builder takes the stamp *before* listing the records and lists them only once the file system's
clock (the mtime of a probe file it creates) has moved past the stamp, so a record written while it
lists always leaves ``cases/`` with another mtime than the stamp, even on file systems whose
timestamps are coarse. Editing a record in place (not through ``prepare``) does not change the
folder's mtime: run ``volumefusion prepare --reindex STORE`` after that.

Each row also holds its record's *version* (inode, size, mtime_ns of ``cases/<id>.json``), so
rebuilding re-reads only the records that changed: ``stat`` for every record, JSON parsing for the
new ones (``volumefusion prepare --reindex`` does this even when ``cases/`` looks unchanged).
Builders take an exclusive lock (``STORE/.cases.index.lock``), check again under it whether the
index is current (another process may just have rebuilt it) and write the file atomically
(temporary file + rename), so shards finishing at once merge their cases one after another, many
processes finding a stale index rebuild it once, and a builder killed mid-way leaves the previous
index intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from volumefusion import VolumeFusionError
from volumefusion.files import atomic_path
from volumefusion.log import get_logger, progress

log = get_logger(__name__)

INDEX_FILE = "cases.index"
LOCK_FILE = ".cases.index.lock"
INDEX_VERSION = 1
_MAGIC = b"\x93VFINDEX"
_ALIGN = 64
_CLASS_BYTES = 32  # a bit per label value 0..255


def row_dtype(id_bytes: int, checksum_bytes: int) -> np.dtype:
    """One case: ``id`` (ASCII), ``shape`` and ``body_box`` (stored-array voxels, box half-open
    ``(3, 2)``), ``spacing_zyx`` (mm), ``labelled``, ``classes`` (bit ``k`` set when label value
    ``k`` is present), ``checksum`` and ``record_version`` (inode, size, mtime_ns of the record file)."""
    return np.dtype([
        ("id", f"S{max(1, id_bytes)}"), ("shape", "<i4", (3,)), ("spacing_zyx", "<f8", (3,)),
        ("body_box", "<i4", (3, 2)), ("labelled", "?"), ("classes", "u1", (_CLASS_BYTES,)),
        ("checksum", f"S{max(1, checksum_bytes)}"), ("record_version", "<i8", (3,)),
    ])


class CaseInfo(NamedTuple):
    """What the index knows of one case (see :class:`~volumefusion.data.store.CaseRecord` for the
    meaning of the fields); the full record is read only by ``Store.case``. (A named tuple: loaders
    make one per crop.)"""

    id: str
    shape: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    body_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    labelled: bool
    label_classes: list[int]
    checksum: str


class CaseIndex:
    """The rows of an index, sorted by id: ``rows`` is a structured array (:func:`row_dtype`),
    memory-mapped when read from a file; ``stamp`` the ``cases/`` mtime it was built at; ``reread``
    how many records :func:`update_index` read from their files to build it (0: none had changed)."""

    def __init__(self, rows: np.ndarray, stamp: int | None):
        self.rows, self.stamp = rows, stamp
        self.reread = 0
        # plain views of the columns: indexing a memmap makes a memmap object each time (slower)
        self._columns = {name: np.asarray(rows[name]) for name in rows.dtype.names}

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> list[str]:
        return [i.decode() for i in self.rows["id"].tolist()]

    def find(self, case_ids: Sequence[str]) -> np.ndarray:
        """Row of each id (int64), -1 for ids not in the index (a binary search, no per-case dict)."""
        width = self.rows.dtype["id"].itemsize
        encoded = [c.encode("ascii", "replace") for c in case_ids]
        keys = np.array(encoded, dtype=self.rows.dtype["id"])
        ids = self.rows["id"]
        found = np.searchsorted(ids, keys).astype(np.int64)
        hit = (found < len(ids)) & np.array([len(k) <= width for k in encoded], bool)
        hit[hit] = ids[found[hit]] == keys[hit]
        found[~hit] = -1
        return found

    def info(self, row: int) -> CaseInfo:
        c = self._columns
        return CaseInfo(
            id=c["id"][row].decode(), shape=tuple(c["shape"][row].tolist()),
            spacing_zyx=tuple(c["spacing_zyx"][row].tolist()),
            body_box=tuple(map(tuple, c["body_box"][row].tolist())), labelled=bool(c["labelled"][row]),
            label_classes=_bits(int.from_bytes(c["classes"][row].tobytes(), "little")),
            checksum=c["checksum"][row].decode(),
        )

    def label_classes(self) -> list[int]:
        """Every label value present in any case."""
        present = np.bitwise_or.reduce(self.rows["classes"], axis=0) if len(self) else np.zeros(_CLASS_BYTES, "u1")
        return _bits(int.from_bytes(present.tobytes(), "little"))

    def __reduce__(self):
        # A spawned loader worker maps the file again instead of receiving a copy of every row.
        if isinstance(self.rows, np.memmap) and self.rows.filename:
            return _reopen, (self.rows.filename, self.stamp, len(self))
        return CaseIndex, (np.asarray(self.rows), self.stamp)


def _bits(mask: int) -> list[int]:
    """Positions of the set bits of ``mask``, ascending (a loop per set bit, not per possible one)."""
    found = []
    while mask:
        low = mask & -mask
        found.append(low.bit_length() - 1)
        mask ^= low
    return found


def _reopen(path: str, stamp: int | None, count: int) -> CaseIndex:
    index = read_index_file(Path(path))
    if index is None or index.stamp != stamp or len(index) != count:
        raise VolumeFusionError(f"{path}: the store's index changed while a loader was starting; restart the run")
    return index


# ------------------------------------------------------------------------------------- file format


def _cases_stamp(store: Path) -> int | None:
    try:
        return os.stat(store / "cases").st_mtime_ns
    except FileNotFoundError:
        return None


def read_index_file(path: Path) -> CaseIndex | None:
    """The index in ``path`` (rows memory-mapped), or None when the file is missing, truncated, of
    another version or not an index at all (then it is rebuilt)."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(_MAGIC) + 4)
            if len(start) < len(_MAGIC) + 4 or start[: len(_MAGIC)] != _MAGIC:
                return None
            (length,) = struct.unpack("<I", start[len(_MAGIC):])
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("version") != INDEX_VERSION:
        return None
    try:
        dtype = row_dtype(int(header["id_bytes"]), int(header["checksum_bytes"]))
        count, stamp = int(header["count"]), header["stamp"]
    except (KeyError, TypeError, ValueError):
        return None
    offset = len(_MAGIC) + 4 + length
    if size != offset + count * dtype.itemsize:
        return None
    rows = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.empty(0, dtype)
    return CaseIndex(rows, stamp)


def _encode(rows: np.ndarray, stamp: int | None) -> bytes:
    header = {"version": INDEX_VERSION, "count": len(rows), "id_bytes": rows.dtype["id"].itemsize,
              "checksum_bytes": rows.dtype["checksum"].itemsize, "stamp": stamp}
    text = json.dumps(header).encode()
    pad = -(len(_MAGIC) + 4 + len(text)) % _ALIGN
    text += b" " * pad
    return _MAGIC + struct.pack("<I", len(text)) + text


def _write_index_file(path: Path, rows: np.ndarray, stamp: int | None) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_encode(rows, stamp))
        f.write(memoryview(np.ascontiguousarray(rows)).cast("B"))


# ------------------------------------------------------------------------------------- building


def _record_row(path: str, version: tuple[int, int, int]) -> tuple:
    """The row values of one record file (as the tuple a structured array takes)."""
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read())
        classes = 0
        for k in d.get("label_classes", []):
            classes |= 1 << int(k)
        return (d["id"].encode("ascii"), d["shape"], d["spacing_zyx"], d["body_box"],
                d.get("label_source") is not None, tuple(classes.to_bytes(_CLASS_BYTES, "little")),
                d.get("checksum", "").encode("ascii"), version)
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise VolumeFusionError(f"{path}: unreadable case record ({exc}); delete it and re-run prepare") from None


def _record_files(store: Path) -> list[tuple[str, str, tuple[int, int, int]]]:
    """``(id, path, version)`` of every record file, sorted by id; temporary files of writers skipped."""
    found = []
    try:
        entries = list(os.scandir(store / "cases"))
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        if name.endswith(".json") and not name.startswith("."):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # replaced or deleted while listing: the folder's mtime has moved on
            found.append((name[:-5], entry.path, (st.st_ino, st.st_size, st.st_mtime_ns)))
    found.sort(key=lambda item: item[0])
    return found


def _fs_clock(folder: Path) -> int:
    """The file system's current time (ns): the mtime of a probe file created in ``folder``."""
    fd, probe = tempfile.mkstemp(prefix=".clock.", dir=folder)
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
        os.unlink(probe)


def _stable_stamp(store: Path) -> int | None:
    """The ``cases/`` mtime to record, once the file system's clock has passed it (module docstring)."""
    stamp = _cases_stamp(store)
    if stamp is not None:
        while _fs_clock(store) <= stamp:
            time.sleep(0.005)
    return stamp


def _build_rows(store: Path, previous: CaseIndex | None) -> tuple[np.ndarray, int]:
    """Rows of every record in ``store``, reusing ``previous`` rows whose record version is unchanged,
    and how many records were read."""
    files = _record_files(store)
    versions = np.array([version for _, _, version in files], dtype=np.int64).reshape(len(files), 3)
    old = np.full(len(files), -1, np.int64)
    id_bytes, checksum_bytes = max([1] + [len(i) for i, _, _ in files]), len("sha256:") + 64
    if previous is not None and len(previous):
        old = previous.find([i for i, _, _ in files])
        known = old >= 0
        unchanged = np.zeros(len(files), bool)
        unchanged[known] = (previous.rows["record_version"][old[known]] == versions[known]).all(axis=1)
        old[~unchanged] = -1
        checksum_bytes = max(checksum_bytes, previous.rows.dtype["checksum"].itemsize)
    rows = np.zeros(len(files), row_dtype(id_bytes, checksum_bytes))
    kept = old >= 0
    if kept.any():
        rows[kept] = previous.rows[old[kept]]
    fresh = np.flatnonzero(~kept).tolist()
    if fresh:
        log.info("%s: reading %d case records into the index", store, len(fresh))
    for n in progress(fresh, desc="index", unit="record", mininterval=1):
        value = _record_row(files[n][1], files[n][2])
        if len(value[0]) > id_bytes or len(value[6]) > checksum_bytes:  # an id unlike its file name
            id_bytes, checksum_bytes = max(id_bytes, len(value[0])), max(checksum_bytes, len(value[6]))
            rows = rows.astype(row_dtype(id_bytes, checksum_bytes))
        rows[n] = value
    # sorted by the records' own ids (normally their file names, by which ``files`` is sorted)
    return rows[np.argsort(rows["id"], kind="stable")], len(fresh)


class _NotWritable(VolumeFusionError):
    """The index cannot be written (a read-only store)."""


_UNLOCKED: set[Path] = set()
"""Folders whose file system refused a lock (said once each)."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of the file ``path`` (created if missing; waits for its holder), among
    processes on this machine and, where the file system supports locks, on others. A killed holder's
    lock is released by the system. Unlocked where locks are unsupported."""
    try:
        import fcntl

        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. a parallel file system mounted without lock support
            if path.parent not in _UNLOCKED:
                _UNLOCKED.add(path.parent)
                log.warning("%s: this file system refuses file locks (%s): each file is still written whole, "
                            "but two prepare runs writing the same cases at once may both write a case; "
                            "split the work with --shard i/n instead", path.parent, exc)
        yield
    finally:
        handle.close()


def update_index(store: str | Path, *, full: bool = False) -> CaseIndex:
    """Bring ``STORE/cases.index`` up to date with the records and return it. Safe to call from many
    processes at once: they take turns, and one that finds the index already current (another just
    rebuilt it) reads it instead. ``prepare`` calls this at the end of every run and shard.

    ``full`` (``volumefusion prepare --reindex``): look at every record even when ``cases/`` is
    unchanged, to pick up records edited in place. Either way only the records whose file changed
    since the last index are read. Raises VolumeFusionError when a record is unreadable (naming it)
    or the store is not writable.
    """
    store = Path(store)
    with file_lock(store / LOCK_FILE):
        previous = read_index_file(store / INDEX_FILE)
        if not full and previous is not None and previous.stamp == _cases_stamp(store):
            return previous
        try:
            stamp = _stable_stamp(store)
        except OSError as exc:
            raise _NotWritable(f"{store}: cannot write the case index ({exc.strerror or exc})") from None
        rows, reread = _build_rows(store, previous)
        for leftover in store.glob(f".{INDEX_FILE}.*.tmp*"):  # temporary files of killed builders (not the lock)
            leftover.unlink(missing_ok=True)
        try:
            _write_index_file(store / INDEX_FILE, rows, stamp)
        except OSError as exc:
            raise _NotWritable(f"{store}: cannot write the case index ({exc.strerror or exc})") from None
        index = read_index_file(store / INDEX_FILE)
        index.reread = reread
        return index


def load_index(store: str | Path) -> CaseIndex:
    """The store's index for reading: the file when it is current (one ``stat`` of ``cases/`` and one
    read of the header decide), else rebuilt from the records with a warning; when the store is
    read-only the rebuilt index is kept in memory (and rebuilt at every open until someone runs
    ``volumefusion prepare --reindex`` with write access)."""
    store = Path(store)
    index = read_index_file(store / INDEX_FILE)
    if index is not None and index.stamp == _cases_stamp(store):
        return index
    why = "missing or unreadable" if index is None else "older than the case records"
    log.warning("%s: the case index is %s: rebuilding it from cases/*.json", store, why)
    started = time.perf_counter()
    try:
        index = update_index(store)
    except _NotWritable as exc:
        log.warning("%s; this process reads every record instead (run `volumefusion prepare --reindex %s` "
                    "with write access)", exc, store)
        index = CaseIndex(_build_rows(store, index)[0], None)
    log.info("%s: index of %d cases ready in %.1f s", store, len(index), time.perf_counter() - started)
    return index
