"""Library logging and progress bars.

The library logs to the ``volumefusion`` logger and never configures handlers itself; the CLI calls
:func:`setup` once. Progress bars go to stderr and disappear when stderr is not a terminal unless
forced, so tests and batch jobs stay quiet.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("volumefusion")
_quiet = False  # set by setup(-1): the CLI's -q also hides progress bars


def get_logger(name: str) -> logging.Logger:
    """A child of the library logger, e.g. ``get_logger(__name__)``."""
    return logging.getLogger(name if name.startswith("volumefusion") else f"volumefusion.{name}")


def setup(verbosity: int = 0) -> None:
    """Configure console logging for the CLI: 0 = INFO, 1+ = DEBUG, -1 = WARNING and no progress bars."""
    global _quiet
    _quiet = verbosity < 0
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm progress bar; hidden when stderr is not a terminal (set VF_PROGRESS=1 to force it) and
    after ``setup(-1)`` (the CLI's ``-q``)."""
    if _quiet:
        kwargs["disable"] = True
    elif "disable" not in kwargs:
        kwargs["disable"] = not (sys.stderr.isatty() or os.environ.get("VF_PROGRESS") == "1")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
