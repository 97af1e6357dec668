"""The store's case index: equal whether prepared in one go or in concurrent shards, rebuilt (with a
message) when missing or stale, never left half-written, and the crops read through it are those the
per-record store gave before the index existed."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.crop_digest import crops_digest
from volumefusion import VolumeFusionError
from volumefusion.cli import main as cli_main
from volumefusion.data import index as index_module
from volumefusion.data.index import INDEX_FILE, LOCK_FILE, read_index_file, update_index
from volumefusion.data.phantoms import write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.data.sampling import PretrainLoader
from volumefusion.data.store import Store
from volumefusion.preprocess import PrepareSettings

SETTINGS = PrepareSettings(crop_to_body=False)
SHAPE = (12, 24, 24)
SRC = str(Path(__file__).resolve().parents[1] / "src")


# Computed with the code before the index (main at 361f3fe, per-record Store.open), from this
# repository's root:
#   PYTHONPATH=<that checkout>/src python -c "import tempfile, pathlib, tests.crop_digest as c; \
#       print(c.crops_digest(pathlib.Path(tempfile.mkdtemp())))"
# the same numbers from the indexed store mean the same crops.
BEFORE_THE_INDEX = {
    "pretrain": "4abfd342fe7960d354483151785f365c843633547fec2bda6fde3f93d6228b74",
    "pretrain_padded_rank1": "a39d07cc6ee4b6adaa0c5779b6d5086f420cb042a2f835cbcb646ad0a37fa081",
    "pretrain_grid": "d0d5ee520ceebcbf3bf20f7652cd21d664d368e55cee6cb6a99c364339350990",
    "finetune": "a71e7f52c02558fa28c452cb54c5e70f008285f27222abf7b5d6bb167eeeddf6",
}


def test_crops_through_the_index_are_those_of_the_per_record_store(tmp_path):
    assert crops_digest(tmp_path) == BEFORE_THE_INDEX


def _raw(root: Path, seeds=range(1, 9)) -> Path:
    write_phantoms(root / "raw", seeds=seeds, shape=SHAPE)
    return root / "raw" / "images"


def _content(store: Path) -> bytes:
    """The index rows without the record versions (inode, size and time of each record file)."""
    index = read_index_file(store / INDEX_FILE)
    assert index is not None
    return b"".join(index.rows[f].tobytes() for f in index.rows.dtype.names if f != "record_version")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def test_shards_prepared_concurrently_give_the_index_of_one_run(tmp_path, caplog):
    raw = _raw(tmp_path)
    assert prepare([str(raw)], tmp_path / "whole", SETTINGS).ok
    shards = [subprocess.Popen([sys.executable, "-m", "volumefusion", "-q", "prepare", str(raw), "--no-crop",
                                "--out", str(tmp_path / "sharded"), "--shard", f"{i}/2"], env=_env())
              for i in range(2)]
    assert [p.wait(timeout=120) for p in shards] == [0, 0]
    whole, sharded = _content(tmp_path / "whole"), _content(tmp_path / "sharded")
    assert len(Store.open(tmp_path / "whole")) == 8 and whole == sharded
    with caplog.at_level(logging.INFO, logger="volumefusion"):
        assert len(Store.open(tmp_path / "sharded")) == 8
    assert "rebuilding" not in caplog.text  # the last shard left an index that is up to date


def test_a_missing_index_is_rebuilt_with_a_message(tmp_path, caplog):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path))], store, SETTINGS).ok
    expected = _content(store)
    (store / INDEX_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="volumefusion"):
        assert Store.open(store).ids == [f"phantom_{i:04d}" for i in range(1, 9)]
    assert "case index is missing or unreadable: rebuilding it" in caplog.text
    assert _content(store) == expected
    (store / INDEX_FILE).write_bytes((store / INDEX_FILE).read_bytes()[:-10])  # truncated: rebuilt too
    assert len(Store.open(store)) == 8 and _content(store) == expected


def _prepare_without_index_merge(inputs: list[str], store: Path) -> None:
    """A prepare run killed just before it merges its cases into the index."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("volumefusion.data.prepare.update_index", lambda path: None)
        assert prepare(inputs, store, SETTINGS).ok


def test_a_stale_index_is_rebuilt_never_trusted(tmp_path, caplog):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok
    (store / "cases" / "phantom_0001.json").unlink()  # a case removed by hand ...
    write_phantoms(tmp_path / "more", seeds=[3], shape=SHAPE)
    _prepare_without_index_merge([str(tmp_path / "more" / "images")], store)  # ... and one added
    with caplog.at_level(logging.WARNING, logger="volumefusion"):
        opened = Store.open(store)
    assert "case index is older than the case records: rebuilding it" in caplog.text
    assert opened.ids == ["phantom_0002", "phantom_0003"]


def test_a_record_edited_in_place_is_picked_up_by_reindex(tmp_path, capsys, monkeypatch):
    library_logger = logging.getLogger("volumefusion")
    # the CLI configures the library's logging: undo that afterwards
    monkeypatch.setattr(library_logger, "handlers", list(library_logger.handlers))
    monkeypatch.setattr(library_logger, "propagate", library_logger.propagate)
    monkeypatch.setattr(library_logger, "level", library_logger.level)
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok
    record = store / "cases" / "phantom_0002.json"
    content = json.loads(record.read_text())
    record.write_text(json.dumps({**content, "body_box": [[1, 2], [3, 4], [5, 6]]}))  # not via a rename
    assert Store.open(store).info("phantom_0002").body_box != ((1, 2), (3, 4), (5, 6))  # documented limit
    assert cli_main(["prepare", "--reindex", str(store)]) == 0
    assert "index of 2 cases brought up to date: 1 record(s) read again (changed since" in capsys.readouterr().out
    assert Store.open(store).info("phantom_0002").body_box == ((1, 2), (3, 4), (5, 6))
    assert cli_main(["prepare", "--reindex", str(store)]) == 0
    assert "index of 2 cases brought up to date: no record changed" in capsys.readouterr().out


def test_opening_and_sampling_read_no_record(tmp_path, monkeypatch):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok

    def forbidden(*args):
        raise AssertionError("a per-case record was read at start-up")

    monkeypatch.setattr(index_module, "_record_files", forbidden)
    monkeypatch.setattr(index_module, "_record_row", forbidden)
    opened = Store.open(store)
    batch = next(iter(PretrainLoader(opened, (8, 16, 16), 2, seed=0)))
    assert batch["background"].shape == (2, 1, 8, 16, 16)
    assert opened.case("phantom_0001").restore["version"] == 1  # the full record, read on demand


def test_a_read_only_store_opens_from_the_records(tmp_path, monkeypatch, caplog):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok
    (store / INDEX_FILE).unlink()

    def read_only(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(index_module, "_fs_clock", read_only)
    with caplog.at_level(logging.WARNING, logger="volumefusion"):
        assert Store.open(store).ids == ["phantom_0001", "phantom_0002"]
    assert "cannot write the case index (Permission denied)" in caplog.text
    assert not (store / INDEX_FILE).exists()


def test_a_killed_reindex_leaves_the_old_index_valid(tmp_path):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok
    old = (store / INDEX_FILE).read_bytes()
    write_phantoms(tmp_path / "more", seeds=[3], shape=SHAPE)
    _prepare_without_index_merge([str(tmp_path / "more" / "images")], store)
    started = tmp_path / "writing"
    # a reindex that stops for good once the new index is written, just before it replaces the old one
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from volumefusion.data import index
        def stall(src, dst):
            Path({str(started)!r}).write_text(str(src))
            time.sleep(600)
        index.os.replace = stall
        index.update_index({str(store)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env=_env())
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the reindex never got to writing"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert Path(started.read_text()).exists()  # the new index lies written beside the old ...
    assert (store / INDEX_FILE).read_bytes() == old  # ... which is untouched and still reads
    assert read_index_file(store / INDEX_FILE).ids() == ["phantom_0001", "phantom_0002"]
    assert update_index(store).ids() == ["phantom_0001", "phantom_0002", "phantom_0003"]
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(f".{INDEX_FILE}.")) == [LOCK_FILE]


def test_incremental_reindex_equals_a_rebuild_from_scratch(tmp_path):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2, 3]))], store, SETTINGS).ok
    (store / "cases" / "phantom_0002.json").unlink()
    write_phantoms(tmp_path / "more", seeds=[14], shape=SHAPE)
    assert prepare([str(tmp_path / "more" / "images")], store, SETTINGS).ok  # merged incrementally
    incremental = (store / INDEX_FILE).read_bytes()
    (store / INDEX_FILE).unlink()
    update_index(store)
    assert (store / INDEX_FILE).read_bytes() == incremental


def test_a_spawned_worker_maps_the_index_file_again(tmp_path):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok
    opened = Store.open(store)
    clone = pickle.loads(pickle.dumps(opened))
    assert isinstance(clone.index.rows, np.memmap) and clone.ids == opened.ids
    assert len(pickle.dumps(opened.index)) < 1000  # the path and stamp, not the rows
    write_phantoms(tmp_path / "more", seeds=[3], shape=SHAPE)
    assert prepare([str(tmp_path / "more" / "images")], store, SETTINGS).ok
    with pytest.raises(VolumeFusionError, match="index changed while a loader was starting"):
        pickle.loads(pickle.dumps(opened))


def test_a_record_whose_id_is_longer_than_its_file_name_keeps_its_id(tmp_path):
    store = tmp_path / "store"
    assert prepare([str(_raw(tmp_path, seeds=[1, 2]))], store, SETTINGS).ok
    record = json.loads((store / "cases" / "phantom_0002.json").read_text())
    (store / "cases" / "b.json").write_text(json.dumps({**record, "id": "b_named_at_length"}))
    assert Store.open(store).ids == ["b_named_at_length", "phantom_0001", "phantom_0002"]
