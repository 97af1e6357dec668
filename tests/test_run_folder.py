"""One run per folder: a second run into a folder another run holds is refused in one line, and a
holder killed with SIGKILL leaves nothing that blocks the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY_MODEL
from volumefusion.cli import main
from volumefusion.files import FOLDER_LOCK

HOLD = "import sys, time; from volumefusion.files import folder_lock\nwith folder_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """A separate process holding ``tmp_path/run`` as a run would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "demo", "probe"])
def test_a_second_run_into_a_held_folder_is_refused_in_one_line(holder, tmp_path, capsys, command, phantom_store,
                                                                 phantom_dataset):
    run = tmp_path / "run"
    args = {"pretrain": ["pretrain", "--data", str(phantom_store), "--out", str(run), *_sets(TINY_MODEL)],
            "finetune": ["finetune", "--data", str(phantom_dataset), "--pretrained", "none", "--out", str(run),
                         *_sets(TINY_MODEL)],
            "demo": ["demo", "--quick", "--out", str(run)],
            "probe": ["probe", "builtin:demo", "--data", str(phantom_dataset), "--out", str(run)]}
    assert main(["-q", *args[command]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{run}: another run is using this folder (pid {holder.pid} on " in err, err
    assert sorted(p.name for p in run.iterdir()) == [FOLDER_LOCK]  # nothing of the refused run


def test_a_killed_holder_does_not_block_the_next_run(holder, tmp_path, phantom_dataset):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / FOLDER_LOCK).is_file()  # the stale file stays, and is not obeyed
    run = ["finetune", "--data", str(phantom_dataset), "--pretrained", "none", "--out", str(tmp_path / "run"),
           *_sets([*TINY_MODEL, "run.max_steps=1", "run.val_every=100"])]
    assert main(["-q", *run]) == 0
    assert not (tmp_path / "run" / FOLDER_LOCK).exists()  # a run that ends removes its lock file


def test_predict_refuses_an_output_folder_another_predict_holds(holder, tmp_path, capsys, phantom_dataset):
    model = tmp_path / "ft"
    assert main(["-q", "finetune", "--data", str(phantom_dataset), "--pretrained", "none", "--out", str(model),
                 *_sets([*TINY_MODEL, "run.max_steps=1", "run.val_every=100"])]) == 0
    started = time.monotonic()
    assert main(["-q", "predict", "-m", str(model / "checkpoints" / "latest.pt"), "-i",
                 str(phantom_dataset / "imagesTr"), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "-o " in err and "another run is using this folder" in err, err
    assert not list((tmp_path / "run").glob("*.nii.gz")) and time.monotonic() - started < 60
