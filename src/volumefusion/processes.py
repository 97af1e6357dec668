"""Worker processes that never outlive the process that started them.

A pool worker blocked in a read, or busy with a large volume, keeps running when its parent is
killed with ``kill -9`` (or the out-of-memory killer): reparented to PID 1, holding hundreds of MB,
until someone finds it. Workers of :func:`worker_pool` end with their parent: on Linux the kernel
sends them SIGKILL when it dies (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread also checks
once a second that the parent is still there. Once its workers are gone, the multiprocessing
resource tracker sees its pipe close and exits too.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from volumefusion.device import resolve_device

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_SECONDS = 1.0
"""How often a worker checks that its parent is alive where the kernel cannot tell it."""


def die_with_parent(parent_pid: int) -> None:
    """Make the calling process end when ``parent_pid`` (its parent) ends; a pool initializer."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # no prctl (an unusual libc): the thread below still watches
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        os._exit(1)  # no cleanup to run: the parent that wanted the result is gone

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of ``workers`` spawned processes (no inherited threads or CUDA state) that die
    with this process."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_workers(device: str, workers: int | None, jobs: int) -> tuple[int, int | None]:
    """``(processes, torch threads per process)``: on a CPU one process per core by default (a small
    3D network gains little from a second intra-op thread, and independent runs scale linearly); on
    a GPU one process (None: threads unchanged)."""
    if resolve_device(device).type != "cpu":
        return 1, None
    cores = cpu_count()
    workers = max(1, min(workers or cores, jobs))
    return workers, max(1, cores // workers)
