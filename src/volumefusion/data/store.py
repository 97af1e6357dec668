"""The prepared-data store: plain files in a folder, written by ``volumefusion prepare``.

Layout::

    STORE/
      store.json              format version, preparation settings, label names
      cases/<id>.json         one record per finished case (a CaseRecord), written last
      cases.index             what sampling needs of every record, in one file (see data/index.py)
      arrays/<id>/image.b2nd  int16 HU, (z, y, x), blosc2 NDArray
      arrays/<id>/label.b2nd  uint8 labels, (z, y, x) (only for labelled cases)

A case exists once its record file exists: arrays are written first (into a private folder, moved
into place), the record last, so a killed run never leaves a half case; the move and the record are
written under the store's writer lock (``.write.lock``), after a last look at the case's record, so
two runs writing one case id never both succeed. The private folder
(``arrays/.<id>.<pid>-<host>.<hex>.tmp``) names its writer, so the next ``prepare`` on that machine
removes the folders of killed writers. :meth:`Store.open` reads the index, not the records (a record
is read only when its case's :meth:`Store.case` is asked for, e.g. to restore a prediction), and
rebuilds the index when it is missing or older than the records. Arrays are chunked
``(32, 128, 128)`` with ``(8, 32, 32)`` blocks, LZ4HC + bit shuffle: a ``[64, 128, 128]`` crop
decompresses only the blocks it touches, LZ4 decodes fast, and bit shuffle brings the size
within a few percent of ZSTD's (see ``benchmarks/store.py`` for the measurement behind this choice).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError
from volumefusion.data.index import INDEX_FILE, CaseIndex, CaseInfo, file_lock, load_index, update_index
from volumefusion.files import atomic_path, atomic_write_text, short_name, write_failure
from volumefusion.io import is_image_file
from volumefusion.log import get_logger

log = get_logger(__name__)

FORMAT = "volumefusion-store"
VERSION = 1
CHUNKS = (32, 128, 128)
BLOCKS = (8, 32, 32)
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
STORE_ENTRIES = ("store.json", "cases", "arrays", INDEX_FILE)
"""what a store folder holds (besides hidden temporary files and locks)."""
WRITE_LOCK = ".write.lock"
"""The lock under which a case's record is checked and its files are put in place (:func:`write_case`)."""


_PRIVATE = re.compile(r"\.(?P<case>.+)\.(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]*)\.[0-9a-f]{12}\.tmp")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def private_folder(store_path: str | Path, case_id: str) -> Path:
    """A new name for the folder a writer fills before moving it to :func:`case_dir`; it names the
    writing process and machine (see :func:`remove_killed_writers_folders`)."""
    name = f".{short_name(case_id)}.{os.getpid()}-{_host()}.{secrets.token_hex(6)}.tmp"
    return case_dir(store_path, case_id).parent / name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_killed_writers_folders(store_path: str | Path) -> tuple[int, int]:
    """Remove the private folders left by writers on this machine that no longer run (a killed
    ``prepare``: SIGKILL, power loss; what they held was never part of the store). Returns (removed,
    kept): folders of running writers or of other machines stay."""
    removed = kept = 0
    arrays = Path(store_path) / "arrays"
    for folder in arrays.glob(".*.tmp") if arrays.is_dir() else ():
        found = _PRIVATE.fullmatch(folder.name)
        if found and found["host"] == _host() and not _alive(int(found["pid"])):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        else:
            kept += 1
    return removed, kept


def safe_case_id(name: str) -> str:
    """``name`` made usable as a file name, readable and without losing what tells names apart.

    Accented letters lose their accents (``Müller`` -> ``Muller``); other characters outside
    ``A-Za-z0-9._-`` become ``_`` (``a b`` -> ``a_b``). A name with letters that have no ASCII form
    (``肝臓_3``) keeps what is left and gains 8 hex digits of a hash of the whole name
    (``3_0c9d5b1e``), so two such names never become the same id.
    """
    name = unicodedata.normalize("NFC", name)
    ascii_form = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", ascii_form).lstrip("._-")
    if any(ord(c) > 127 for c in ascii_form):
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        cleaned = f"{cleaned.strip('_')}_{digest}" if cleaned.strip("_") else f"case_{digest}"
    return cleaned or "case"


@dataclass
class CaseRecord:
    """One prepared case (``cases/<id>.json``).

    ``shape`` and ``spacing_zyx`` (mm) describe the stored arrays; ``body_box`` is
    ``((z0, z1), (y0, y1), (x0, x1))``, half-open, in stored-array voxels; ``label_classes`` the
    non-zero label values present; ``checksum`` a sha256 of the stored arrays' bytes; ``restore`` what
    :func:`volumefusion.preprocess.restore_to_original` needs to map results back onto the source
    grid; ``settings`` the :class:`~volumefusion.preprocess.PrepareSettings` used;
    ``source_version`` what identified the source files' version when they were read
    (:func:`volumefusion.data.prepare.source_version`; empty in records written before it existed);
    ``channel`` the volume / component taken from a 4D or vector image (``prepare --channel``), None
    for the default.
    """

    id: str
    source: str
    label_source: str | None
    shape: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    body_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    label_classes: list[int] = field(default_factory=list)
    checksum: str = ""
    restore: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    source_version: dict = field(default_factory=dict)
    channel: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CaseRecord:
        return cls(
            id=d["id"], source=d["source"], label_source=d.get("label_source"),
            shape=tuple(d["shape"]), spacing_zyx=tuple(d["spacing_zyx"]),
            body_box=tuple(tuple(b) for b in d["body_box"]), label_classes=list(d.get("label_classes", [])),
            checksum=d.get("checksum", ""), restore=d.get("restore", {}), settings=d.get("settings", {}),
            source_version=d.get("source_version", {}), channel=d.get("channel"),
        )


class StoreChanged(VolumeFusionError):
    """A stored array was replaced or removed while a reader had it open: the store was prepared again
    (sources replaced) during training. blosc2 re-reads an open array's file by its path, so an array
    that another ``prepare`` rewrote cannot be read on; the run must stop and start again on the
    store as it is now.

    Raised in a DataLoader worker, torch re-raises it in the training process with the worker's
    traceback as the message; the one-line message the worker raised is kept instead.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__} ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class CaseArray:
    """A stored ``(z, y, x)`` array; slicing it returns an ``np.ndarray`` read from the touched blocks only.

    Picklable (it reopens the file in the receiving process), so loader workers can share it. A read
    that fails because the file was replaced or removed since it was opened raises :class:`StoreChanged`.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._array = None
        self._version: tuple[int, int] | None = None

    def _file_version(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def _changed(self, opened: bool) -> StoreChanged:
        if not opened:
            problem = "is missing, though the store's index lists its case"
        else:
            problem = f"was {'removed' if self._file_version() is None else 'replaced'} while it was being read"
        return StoreChanged(f"{self.path}: the stored array {problem}: was the store prepared again (sources "
                            "replaced) while this run read it? Re-prepare a store only when no run reads it; "
                            "then start the run again (or --resume it) on the store as it is now")

    def _open(self):
        if self._array is None:
            import blosc2

            version = self._file_version()
            if version is None:
                raise self._changed(opened=False)
            # One decompression thread: loader parallelism comes from worker processes.
            try:
                self._array = blosc2.open(str(self.path), mode="r", dparams={"nthreads": 1})
            except Exception as exc:  # blosc2 raises RuntimeError for a truncated or damaged file
                raise self._damaged(exc) from None
            self._version = version
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._open().shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._open().dtype)

    def __getitem__(self, key) -> np.ndarray:
        array = self._open()
        try:
            return np.asarray(array[key])
        except Exception as exc:  # blosc2 says "Error while refreshing the array" of a file replaced under it
            if self._file_version() != self._version:
                raise self._changed(opened=True) from None
            raise self._damaged(exc) from None

    def _damaged(self, exc: Exception) -> VolumeFusionError:
        return VolumeFusionError(f"{self.path}: the stored array cannot be read ({' '.join(str(exc).split())[:120]}): "
                                 "damaged on disk? Run `volumefusion prepare` again with the same inputs and --out: "
                                 "it redoes damaged cases")

    def read(self) -> np.ndarray:
        """The whole array."""
        return self[...]

    def __getstate__(self):
        return {"path": self.path, "_array": None, "_version": None}


def write_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (3D) as a chunked, compressed blosc2 NDArray, atomically."""
    import blosc2

    array = np.ascontiguousarray(array)
    chunks = tuple(min(c, s) for c, s in zip(CHUNKS, array.shape))
    blocks = tuple(min(b, c) for b, c in zip(BLOCKS, chunks))
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE],
               "typesize": array.dtype.itemsize, "nthreads": 1}
    with atomic_path(path) as tmp:
        tmp.unlink()  # blosc2 refuses to overwrite the placeholder atomic_path created
        try:
            blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)
        except RuntimeError as exc:  # blosc2 says only "Error while creating the NDArray"
            raise write_failure(path, f"cannot write the array ({exc})") from None



def array_checksum(image: np.ndarray, label: np.ndarray | None) -> str:
    """sha256 over dtype, shape and bytes of the image, then the label (if any)."""
    digest = hashlib.sha256()
    for array in (image, label):
        if array is not None:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
    return "sha256:" + digest.hexdigest()


def _store_json(path: Path) -> Path:
    return Path(path) / "store.json"


def init_store(path: str | Path, settings: dict, label_names: dict[int, str] | None) -> None:
    """Create ``store.json`` or check that an existing store was prepared the same way.

    Raises VolumeFusionError when the store exists with other settings or label names (mixing them
    would make cases incomparable). Shards may call this concurrently: they write identical content.
    """
    path = Path(path)
    meta_path = _store_json(path)
    names = {str(k): v for k, v in sorted(label_names.items())} if label_names else None
    if meta_path.exists():
        meta = _read_meta(path)
        if meta["settings"] != settings:
            raise VolumeFusionError(
                f"{path}: store was prepared with settings {meta['settings']}, this run asks for {settings}; "
                "use the same options or another --out folder"
            )
        if names is not None and meta.get("label_names") not in (None, names):
            raise VolumeFusionError(
                f"{path}: store has label names {meta['label_names']}, this run brings {names}; "
                "use another --out folder for a dataset with other labels"
            )
        if names is None or meta.get("label_names") == names:
            return
        meta["label_names"] = names
    else:
        meta = {"format": FORMAT, "version": VERSION, "array_format": "blosc2", "settings": settings,
                "label_names": names}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")


def name_found_labels(path: str | Path) -> None:
    """Name in ``store.json`` every class found in the store's label maps that it does not name yet:
    ``{"0": "background", "K": "label_K"}``, the form a dataset.json's labels take, so a store of
    label maps given without names (``prepare --labels``) can be fine-tuned. No labelled case: no change.

    Brings the index up to date first, so a run (or shard) finishing last names the classes of all cases.
    """
    path = Path(path)
    meta = _read_meta(path)
    index = update_index(path)
    names = dict(meta.get("label_names") or {"0": "background"})
    for k in index.label_classes():
        names.setdefault(str(k), f"label_{k}")
    names = dict(sorted(names.items(), key=lambda item: int(item[0])))
    labelled = bool(len(index)) and bool(index.rows["labelled"].any())
    if labelled and names != meta.get("label_names"):
        atomic_write_text(_store_json(path), json.dumps({**meta, "label_names": names}, indent=1) + "\n")


def reindex(path: str | Path) -> CaseIndex:
    """``volumefusion prepare --reindex``: bring the index of the store at ``path`` up to date with
    its records, looking at every record (see :func:`~volumefusion.data.index.update_index`)."""
    path = Path(path)
    if not _store_json(path).exists():
        raise VolumeFusionError(f"{path}: not a volumefusion store (no store.json); {_prepare_hint(path)}")
    _read_meta(path)
    return update_index(path, full=True)


def _prepare_hint(path: Path) -> str:
    """How to make a store from ``path``, never by writing into it (it may hold the raw images)."""
    folder = path.parent if path.name == "dataset.json" else path
    if (folder / "dataset.json").is_file():
        return (f"{folder} is a raw dataset (dataset.json); prepare it into a new folder with "
                f"`volumefusion prepare {folder} --out STORE` (finetune --data takes the dataset folder itself)")
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()] if path.is_dir() else []
    if any(is_image_file(p) or p.suffix.lower() == ".dcm" for p in files):
        return (f"{path} holds raw images; prepare them into a new folder with "
                f"`volumefusion prepare {path} --out STORE`")
    return "prepare one with `volumefusion prepare INPUT... --out STORE` (a new folder)"


def _read_meta(path: Path) -> dict:
    meta_path = _store_json(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise VolumeFusionError(f"{meta_path}: unreadable store description ({exc})") from None
    if meta.get("format") != FORMAT:
        raise VolumeFusionError(f"{meta_path}: not a volumefusion store")
    if meta.get("version", 0) > VERSION:
        raise VolumeFusionError(
            f"{meta_path}: store format version {meta['version']} is newer than this volumefusion "
            f"understands ({VERSION}); upgrade volumefusion"
        )
    return meta


def case_dir(store_path: str | Path, case_id: str) -> Path:
    return Path(store_path) / "arrays" / case_id


def record_path(store_path: str | Path, case_id: str) -> Path:
    return Path(store_path) / "cases" / f"{case_id}.json"


def case_problem(store_path: str | Path, record: CaseRecord) -> str | None:
    """What is wrong with a finished case's stored arrays, found without decompressing them: an array
    missing, or one that does not open or lacks the record's shape (a truncated file does not open);
    None when they look whole. ``Store.verify`` compares every byte with the record's checksum."""
    folder = case_dir(store_path, record.id)
    for name in ("image.b2nd", "label.b2nd") if record.label_source else ("image.b2nd",):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            shape = CaseArray(path).shape
        except VolumeFusionError:
            return f"{path} does not open (truncated or damaged)"
        if shape != tuple(record.shape):
            return f"{path} holds {list(shape)} voxels, its record says {list(record.shape)}"
    return None


def read_record(store_path: str | Path, case_id: str) -> CaseRecord | None:
    """The record of a finished case; None when there is none, or when it is damaged (not JSON, fields
    missing): the case then counts as not prepared, so ``prepare`` writes it again."""
    path = record_path(store_path, case_id)
    if not path.exists():
        return None
    try:
        return CaseRecord.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: damaged record (%s); the case counts as not prepared", path, type(exc).__name__)
        return None


def write_case(
    store_path: str | Path,
    prepared,
    *,
    case_id: str,
    source: str,
    label_source: str | None = None,
    settings: dict,
    source_version: dict | None = None,
    channel: int | None = None,
    check: Callable[[CaseRecord | None], bool] | None = None,
) -> CaseRecord | None:
    """Write a :class:`~volumefusion.preprocess.PreparedCase` into the store and return its record.

    The arrays are written into a private folder first; then, holding the store's writer lock,
    ``check(current record or None)`` decides: False leaves the case as another writer left it (and
    returns None), an exception refuses the write, True goes on. Under the same lock the old record
    is removed, the new arrays are moved into place and the record file comes last. So two runs that
    write one case id never both succeed (the second sees the first's record), and a killed run never
    leaves a half case.
    """
    if not _CASE_ID.fullmatch(case_id):
        raise ValueError(f"case id {case_id!r} is not a safe file name; use safe_case_id()")
    store_path = Path(store_path)
    record_file = record_path(store_path, case_id)
    folder = case_dir(store_path, case_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    private = private_folder(store_path, case_id)
    private.mkdir()
    try:
        write_array(private / "image.b2nd", prepared.image)
        if prepared.label is not None:
            write_array(private / "label.b2nd", prepared.label)
        classes = [int(v) for v in np.unique(prepared.label) if v != 0] if prepared.label is not None else []
        record = CaseRecord(
            id=case_id, source=source, label_source=label_source, shape=tuple(prepared.image.shape),
            spacing_zyx=tuple(float(s) for s in prepared.spacing_zyx),
            body_box=tuple(tuple(int(v) for v in b) for b in prepared.body_box), label_classes=classes,
            checksum=array_checksum(prepared.image, prepared.label), restore=prepared.restore, settings=settings,
            source_version=source_version or {}, channel=channel,
        )
        with file_lock(store_path / WRITE_LOCK):
            if check is not None and not check(read_record(store_path, case_id)):
                return None
            record_file.unlink(missing_ok=True)
            for leftover in record_file.parent.glob(f".{case_id}.json.*"):
                leftover.unlink(missing_ok=True)  # a killed writer's temporary record
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(private, folder)
            atomic_write_text(record_file, json.dumps(record.to_dict(), indent=1) + "\n")
        return record
    finally:
        shutil.rmtree(private, ignore_errors=True)


class Store:
    """Read access to a prepared store. Open with :meth:`Store.open`.

    ``index`` holds what sampling needs of every case as NumPy arrays (:class:`CaseIndex`, rows
    sorted by id); :meth:`info` gives one case's entry, :meth:`case` its full record from disk.
    """

    def __init__(self, path: Path, meta: dict, index: CaseIndex):
        self.path = path
        self.meta = meta
        self.index = index

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open the store at ``path``; VolumeFusionError if it is missing, not a store, or empty.

        Reads ``store.json`` and the index (no per-case file), rebuilding the index first when it
        is missing or older than the records (see :mod:`volumefusion.data.index`).
        """
        path = Path(path)
        if not path.exists():
            raise VolumeFusionError(f"{path}: no such store folder; {_prepare_hint(path)}")
        if not _store_json(path).exists():
            raise VolumeFusionError(f"{path}: not a volumefusion store (no store.json); {_prepare_hint(path)}")
        meta = _read_meta(path)
        index = load_index(path)
        if not len(index):
            raise VolumeFusionError(f"{path}: store holds no prepared cases; prepare cases into it with "
                                    f"`volumefusion prepare INPUT... --out {path}`")
        return cls(path, meta, index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> list[str]:
        """Every case id, sorted."""
        return self.index.ids()

    @property
    def settings(self) -> dict:
        """The preparation settings every case in the store shares."""
        return self.meta["settings"]

    @property
    def label_names(self) -> dict[int, str] | None:
        names = self.meta.get("label_names")
        return {int(k): v for k, v in names.items()} if names else None

    def rows(self, case_ids: Sequence[str]) -> np.ndarray:
        """Index rows (int64) of ``case_ids``; VolumeFusionError naming the ids not in the store."""
        rows = self.index.find(case_ids)
        if (rows < 0).any():
            unknown = [c for c, r in zip(case_ids, rows) if r < 0]
            if len(unknown) == 1:
                raise VolumeFusionError(f"{self.path}: no case {unknown[0]!r} in the store")
            raise VolumeFusionError(f"{self.path}: {len(unknown)} requested cases are not in the store, "
                                    f"e.g. {unknown[:3]}; check the case ids or the split file")
        return rows

    def info(self, case_id: str) -> CaseInfo:
        """The index entry of one case (shape, spacing, body box, label classes, checksum)."""
        return self.index.info(self.rows([case_id])[0])

    def case(self, case_id: str) -> CaseRecord:
        """The full record of one case (restore recipe, sources, settings), read from ``cases/<id>.json``."""
        self.rows([case_id])
        record = read_record(self.path, case_id)
        if record is None:
            raise VolumeFusionError(f"{record_path(self.path, case_id)}: record deleted or damaged since the store "
                                    "was opened; re-run prepare")
        return record

    def image(self, case_id: str) -> CaseArray:
        """int16 HU ``(z, y, x)``."""
        self.rows([case_id])
        return CaseArray(case_dir(self.path, case_id) / "image.b2nd")

    def label(self, case_id: str) -> CaseArray | None:
        """uint8 labels ``(z, y, x)``, or None for an unlabelled case."""
        if not self.info(case_id).labelled:
            return None
        return CaseArray(case_dir(self.path, case_id) / "label.b2nd")

    def verify(self, case_id: str) -> bool:
        """True when the stored arrays still match the record's checksum (reads the whole case)."""
        label = self.label(case_id)
        actual = array_checksum(self.image(case_id).read(), None if label is None else label.read())
        return actual == self.info(case_id).checksum
