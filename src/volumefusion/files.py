"""Writing files safely: every file the toolkit writes goes through :func:`atomic_path` (written under a
temporary name beside the target, renamed into place on success), and commands check up front that
their outputs can be written (:func:`check_writable_folder`, :func:`check_writable_file`), before the
expensive part. Plus the path helpers their messages need (:func:`resolved`, :func:`missing_reason`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from volumefusion import VolumeFusionError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_failure(path: str | Path, detail: str) -> OSError:
    """An OSError naming ``path`` for a write that a library (ITK, blosc2) failed without saying why: a
    full disk (ENOSPC) when the file system has almost no room left, else ``detail``."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    if shutil.disk_usage(folder).free < 16 * 2**20:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return OSError(errno.EIO, detail, str(path))


def short_name(name: str, limit: int = 64) -> str:
    """``name``, or when longer than ``limit`` bytes its start and 12 hex digits of a hash of the whole:
    what temporary names built from a file name use, so a valid long name (up to the 255 bytes most
    file systems allow) never makes an invalid temporary one."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name.encode()[:limit - 13].decode(errors='ignore')}~{digest}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, else removed.

    The temporary name keeps the last suffixes of ``path`` (``.nii.gz``, ``.npy``) so writers that look
    at the extension choose the right format, and stays short however long the name
    (:func:`short_name`).
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes[-2:])
        suffix = suffix if len(suffix) <= 16 else path.suffix[:16]
        fd, tmp = tempfile.mkstemp(prefix=f".{short_name(path.name)}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual mode
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is None or Path(exc.filename) in (tmp_path, path.parent):
            # name the file being written, not its temporary twin (disk full, permissions)
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Make sure files can be created in ``folder``, or in the nearest folder above it that exists (where
    it will be created), before a command does its expensive part; VolumeFusionError naming the folder
    and the option ``what`` (``"--out"``) if not. Nothing is created: a run refused later leaves no
    empty folder behind (the writers create folders as they write)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VolumeFusionError(f"{folder}: is a file; {what} takes a folder")
    existing = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise VolumeFusionError(f"{folder}: cannot be created for {what}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise VolumeFusionError(f"{folder}: {what} folder is not writable ({exc.strerror or exc})") from None


def check_writable_file(path: str | Path, what: str) -> None:
    """Make sure a file can be written (atomically) at ``path``: not a folder, its folder writable;
    VolumeFusionError naming the path and the option ``what`` if not. An existing file is fine: it is
    replaced."""
    path = Path(path)
    if path.is_dir():
        raise VolumeFusionError(f"{path}: is a folder; {what} takes a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise VolumeFusionError(f"{path}: cannot be created for {what}: {path.parent} is a file")
    check_writable_folder(path.parent, what)


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with symbolic links resolved, as far as they resolve: a link loop is
    kept as it is instead of raising (the read that follows reports it)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: "Symlink loop" before Python 3.13
        return Path(os.path.abspath(path))


def missing_reason(path: str | Path) -> str:
    """Why ``path`` does not exist, for messages: a plain ``"file not found"``, ``"folder not
    found"`` when it was written as a folder, or what is wrong with the symbolic link it is."""
    as_folder = str(path).endswith(("/", os.sep))
    path = Path(path)
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symbolic link loop (following it leads back to itself)"
            return f"symbolic link to a missing {os.readlink(path)}"
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if parent != path.parent:
        return f"not found (no folder {path.parent})"
    return "folder not found" if as_folder else "file not found"


FOLDER_LOCK = ".volumefusion.lock"
"""The file whose lock a run holds on its folder for its whole life (:func:`folder_lock`)."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold ``folder`` (created if missing) for one run: a second run into it is refused at once, in
    one line naming the folder and the process holding it, rather than mixing its files with this one's.

    The lock is the system's (``flock`` on ``folder/.volumefusion.lock``, removed when the run ends): it
    is released on any exit, and by the kernel when the holder is killed (``kill -9``, out of memory),
    so the file a killed run leaves is never obeyed. Folders it created and the run left empty are
    removed. On a file system that refuses locks the run goes on unguarded, with a warning.
    """
    import fcntl
    import logging
    import socket
    import time

    folder = Path(folder)
    created = [f for f in (folder, *folder.parents) if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FOLDER_LOCK
    locked = False
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - held for the run, closed below
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise VolumeFusionError(f"{option} {folder}: another run is using this folder ({holder}); wait for it "
                                    "to end, or choose another folder") from None
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "%s: this file system refuses file locks (%s): nothing stops a second run from writing into "
                "this folder at the same time", folder, exc)
            break
        # the last holder may have removed the file between our open and our lock: lock the file in place
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            locked = True
            break
        handle.close()
    try:
        if locked:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                path.unlink()  # while still held: a run that opened it before sees the change and retries
        handle.close()
        for made in created:  # a run that wrote nothing (refused before any work) leaves no folder
            with contextlib.suppress(OSError):
                made.rmdir()
