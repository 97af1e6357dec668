"""The store's case index: equal whether prepared in one go or in concurrent shards, rebuilt (with a
message) when missing or stale, never left half-written, and the crops read through it are those the
per-record store gave before the index existed."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from volumefusion.data.index import INDEX_FILE, load_index, read_index_file, update_index
from volumefusion.data.phantoms import write_msd_dataset, write_phantoms
from volumefusion.data.prepare import PrepareSettings, prepare
from volumefusion.data.store import Store

from tests.crop_digest import crops_digest

SETTINGS = PrepareSettings(crop_to_body=False)
SRC = str(Path(__file__).resolve().parents[1] / "src")


# Computed with the code before the index (main at 361f3fe, per-record Store.open), from this
# repository's root:
#   PYTHONPATH=<that checkout>/src python -c "import tempfile, pathlib, tests.crop_digest as c; \
#       print(c.crops_digest(pathlib.Path(tempfile.mkdtemp())))"
# the same numbers from the indexed store mean the same crops.
BEFORE_THE_INDEX = {}


def test_crops_through_the_index_are_those_of_the_per_record_store(tmp_path):
    assert crops_digest(tmp_path) == BEFORE_THE_INDEX
