"""The training engine: exact resume, DDP, signals, validation, early errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL
from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import load_checkpoint, nonfinite_tensors
from volumefusion.config import OptimConfig
from volumefusion.train import engine
from volumefusion.train.engine import lr_factor
from volumefusion.train.logging import RunLogger
from volumefusion.train.runs import evaluate_pretext, pretrain


def _cfg(*extra):
    return config.load(overrides=TINY_MODEL + list(extra))


def test_step_schedule_halves_every_step_size_after_warmup():
    cfg = OptimConfig(schedule="step", step_size=10, gamma=0.5, warmup_steps=4)
    assert [lr_factor(s, cfg, 100) for s in (0, 3)] == [0.25, 1.0]
    assert [lr_factor(s, cfg, 100) for s in (9, 10, 25)] == [1.0, 0.5, 0.25]


def test_cosine_and_poly_go_from_one_to_zero():
    for schedule in ("cosine", "poly"):
        cfg = OptimConfig(schedule=schedule)
        assert lr_factor(0, cfg, 100) == pytest.approx(1.0)
        assert lr_factor(100, cfg, 100) == pytest.approx(0.0)
        assert 0 < lr_factor(50, cfg, 100) < 1


def test_resumed_run_equals_continuous_run(phantom_store, tmp_path):
    straight = pretrain(_cfg("run.max_steps=6", "run.val_every=100"), phantom_store, tmp_path / "a")
    half = pretrain(_cfg("run.max_steps=3", "run.val_every=100"), phantom_store, tmp_path / "b")
    assert half.step == 3
    resumed = pretrain(_cfg("run.max_steps=6", "run.val_every=100"), phantom_store, tmp_path / "b", resume=True)
    assert straight.step == resumed.step == 6
    a = load_checkpoint(tmp_path / "a/checkpoints/latest.pt")
    b = load_checkpoint(tmp_path / "b/checkpoints/latest.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # the metrics file reads as one run: no duplicated steps after the resume
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s <= 6]
    assert sorted(set(train_steps)) == list(range(1, 7))


def test_a_run_stopped_after_a_step_is_the_start_of_the_full_schedule(phantom_store, tmp_path):
    """run.stop_after ends a run early without shortening its schedule: the learning rate at the stop is
    that of the full run, and a resume goes on to the same weights as a run never stopped."""
    straight = pretrain(_cfg("run.max_steps=6", "run.val_every=100", "run.log_every=1", "optim.schedule=poly"),
                        phantom_store, tmp_path / "a")
    early = pretrain(_cfg("run.max_steps=6", "run.stop_after=3", "run.val_every=100", "run.log_every=1",
                          "optim.schedule=poly"), phantom_store, tmp_path / "b")
    lrs = [[r["lr"] for r in run.history if "lr" in r] for run in (straight, early)]
    assert early.step == 3 and lrs[1] == lrs[0][:3] and lrs[0][2] > lrs[0][5]
    assert load_checkpoint(tmp_path / "b/checkpoints/latest.pt")["step"] == 3
    pretrain(_cfg("run.max_steps=6", "run.val_every=100", "optim.schedule=poly"), phantom_store, tmp_path / "b",
             resume=True)
    a = load_checkpoint(tmp_path / "a/checkpoints/latest.pt")["model"]
    b = load_checkpoint(tmp_path / "b/checkpoints/latest.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_checkpoint_is_self_describing_and_keeps_last_k(phantom_store, tmp_path):
    pretrain(_cfg("run.max_steps=4", "run.checkpoint_every=1", "run.keep_last=2", "run.val_every=2"),
             phantom_store, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == ["step_00000003.pt", "step_00000004.pt"]
    assert (ckpt_dir / "best.pt").exists()
    ckpt = load_checkpoint(ckpt_dir / "latest.pt")
    assert ckpt["step"] == 4 and ckpt["task"]["kind"] == "pretrain" and ckpt["task"]["num_classes"] == 5
    assert ckpt["config"]["model"]["feature_channels"] == [4, 8, 16, 32, 64]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert config.load(tmp_path / "config.yaml").model.feature_channels == (4, 8, 16, 32, 64)
    assert (tmp_path / "progress.png").stat().st_size > 0
    assert list((tmp_path / "images").glob("*.png"))


def test_missing_store_and_bad_crop_fail_early(phantom_store, tmp_path):
    with pytest.raises(VolumeFusionError, match="prepare"):
        pretrain(_cfg(), tmp_path / "no_store", tmp_path / "run")
    with pytest.raises(VolumeFusionError, match="data.crop_size"):
        pretrain(_cfg("data.crop_size=[12,32,32]"), phantom_store, tmp_path / "run")
    with pytest.raises(VolumeFusionError, match="model.in_channels"):
        pretrain(_cfg("model.in_channels=2"), phantom_store, tmp_path / "run")


def test_pretext_task_is_learned(phantom_store, tmp_path):
    # boxes scaled to the tiny [16, 32, 32] crop (the paper's sizes are for [64, 128, 128])
    result = pretrain(_cfg("run.max_steps=150", "run.val_every=50", "run.checkpoint_every=1000",
                           "fusion.num_boxes=[4,16]", "fusion.box_size_min=[4,4,4]", "fusion.box_size_max=[12,20,20]",
                           "optim.lr=2e-3", "optim.schedule=cosine", "optim.warmup_steps=20",
                           "model.dropout=[0,0,0,0,0]", "model.drop_path=0"),
                      phantom_store, tmp_path)
    val = [r for r in result.history if "val_score" in r]
    # validation loss on the fixed fused crops falls and the pretext Dice rises as training goes on
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.05
    assert val[-1]["val_score"] > val[0]["val_score"]


def test_pretext_dice_of_a_checkpoint_on_other_volumes(phantom_store, tmp_path):
    """The gate's measurement: per-level pretext Dice of a pretraining checkpoint on fused crops of a
    store, the same crops for the same seed, with its mean as the score."""
    pretrain(_cfg("run.max_steps=2", "run.val_every=100"), phantom_store, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    first = evaluate_pretext(ckpt, phantom_store, samples=8, seed=3)
    np.testing.assert_equal(first, evaluate_pretext(ckpt, phantom_store, samples=8, seed=3))  # NaN: level absent
    levels = np.array([first[f"dice_a{i}"] for i in range(5)])
    assert first["score"] == pytest.approx(np.nanmean(levels)) and np.nanmin(levels) >= 0 and np.nanmax(levels) <= 1
    assert evaluate_pretext(ckpt, phantom_store, samples=8, seed=4)["loss"] != first["loss"]
    other = load_checkpoint(ckpt)
    other["task"]["kind"] = "segmentation"
    torch.save(other, tmp_path / "seg.pt")
    with pytest.raises(VolumeFusionError, match="not a Volume Fusion pretraining checkpoint"):
        evaluate_pretext(tmp_path / "seg.pt", phantom_store)


def _run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "volumefusion", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _cli_overrides(*extra):
    return [arg for item in TINY_MODEL + list(extra) for arg in ("--set", item)]


def test_sigterm_writes_latest_and_resume_continues(phantom_store, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(phantom_store), "--out", str(out), "--workers", "1",
            *_cli_overrides("run.val_every=1000")]
    proc = _run_cli([*args, "--max-steps", "100000"], start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    # as SLURM and `timeout` do: the whole process group, loader worker included, gets the signal
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output  # stopped, not finished
    step = load_checkpoint(out / "checkpoints/latest.pt")["step"]
    assert 3 <= step < 100000
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert last_logged <= step  # the checkpoint is not behind the metrics
    resumed = _run_cli([*args, "--max-steps", str(step + 2), "--resume"])
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert load_checkpoint(out / "checkpoints/latest.pt")["step"] == step + 2


API_SCRIPT = """
import sys
import volumefusion as vf
try:
    vf.pretrain(sys.argv[1], sys.argv[2], overrides=sys.argv[3:])
except vf.RunInterrupted as exc:
    print("raised", exc.signal, exc)
    sys.exit(3)
print("went on")
"""


def test_ctrl_c_in_a_python_script_raises_run_interrupted_after_writing_latest(phantom_store, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", API_SCRIPT, str(phantom_store), str(out), *TINY_MODEL,
                             "run.max_steps=100000", "run.val_every=1000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3 and "raised SIGINT" in output and "went on" not in output, output
    assert "resume=True continues" in output
    assert load_checkpoint(out / "checkpoints/latest.pt")["step"] >= 2


def test_a_run_folder_is_neither_mixed_nor_resumed_with_other_settings(phantom_store, tmp_path):
    pretrain(_cfg("run.max_steps=2", "run.val_every=100"), phantom_store, tmp_path)
    with pytest.raises(VolumeFusionError, match="already holds a run.*--resume"):
        pretrain(_cfg("run.max_steps=2", "run.val_every=100"), phantom_store, tmp_path)
    with pytest.raises(VolumeFusionError, match=r"optim\.lr: 0\.001 -> 0\.5"):
        pretrain(_cfg("run.max_steps=3", "run.val_every=100", "optim.lr=0.5"), phantom_store, tmp_path, resume=True)
    assert config.load(tmp_path / "config.yaml").optim.lr == 0.001  # the refused resume wrote nothing
    # run length, reporting and workers may change
    resumed = pretrain(_cfg("run.max_steps=3", "run.val_every=1", "data.workers=0"), phantom_store, tmp_path,
                       resume=True)
    assert resumed.step == 3


def test_metrics_file_is_strict_json(tmp_path):
    logger = RunLogger(tmp_path)
    logger.log({"step": 1, "val_dice_spleen": float("nan"), "loss": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=pytest.fail) == \
        {"step": 1, "val_dice_spleen": None, "loss": 0.5}


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import volumefusion.train.engine as engine
    from volumefusion import config
    from volumefusion.train.runs import evaluate_pretext, pretrain
    from volumefusion.train.tasks import PretrainTask

    store, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    record = {"seen": [], "saves": []}
    make_inputs = PretrainTask.make_inputs
    def recording_make_inputs(self, batch, generator, device):
        record["seen"].append(batch["background"].float().sum().item())
        return make_inputs(self, batch, generator, device)
    PretrainTask.make_inputs = recording_make_inputs
    save = engine.write_training
    engine.write_training = lambda path, *args: (record["saves"].append(str(path)), save(path, *args))
    fit = engine.Trainer.fit
    def recording_fit(self):
        result = fit(self)
        record["weights"] = [p.detach().sum().item() for p in self.model.parameters()]
        return result
    engine.Trainer.fit = recording_fit
    fail = os.environ.get("FAIL_AT", "")  # "batches:1:2": rank 1's third batch finds the store changed
    if fail:
        from volumefusion.data.store import StoreChanged
        where, rank, count = fail.split(":")
        mine = os.environ["RANK"] == rank
        def change():
            raise StoreChanged("case_1/image.b2nd changed: was the store prepared again?")
        batches, validate, calls = PretrainTask.batches, PretrainTask.validate, []
        def changing_batches(self, *args):
            for i, batch in enumerate(batches(self, *args)):
                if mine and i == int(count):
                    change()
                yield batch
        def changing_validate(self, *args):
            calls.append(None)
            if mine and len(calls) == int(count):
                change()
            return validate(self, *args)
        setattr(PretrainTask, where, changing_batches if where == "batches" else changing_validate)
    try:
        pretrain(config.load(overrides=overrides), store, out)
    except Exception as exc:
        record["error"] = str(exc)
    with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(record, f)
""")


def _torchrun(script_text, tmp_path, store, overrides, **env):
    script = tmp_path / "ddp.py"
    script.write_text(script_text)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1", **env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(script), str(store), str(out), *overrides],
                          env=env, capture_output=True, text=True, timeout=300)
    return proc, out


def test_ddp_two_processes_share_weights_and_see_different_crops(phantom_store, tmp_path):
    proc, out = _torchrun(DDP_SCRIPT, tmp_path, phantom_store, [*TINY_MODEL, "run.max_steps=3", "run.val_every=100"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert len(r1["seen"]) == 3  # rank 0 also builds the validation crops, after its 3 training batches
    assert r0["seen"][:3] != r1["seen"]  # each rank draws its own crops
    assert r0["weights"] == r1["weights"]  # gradients were synchronised
    assert r0["saves"] and not r1["saves"]  # only rank 0 writes checkpoints


@pytest.mark.parametrize("fail_at", ["batches:1:2", "validate:0:1"])
def test_ddp_data_that_changes_under_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(
        phantom_store, tmp_path, fail_at):
    # rank 1's loader finds the store changed in step 3, or rank 0's validation does after step 2:
    # the other rank would wait for it in a collective; all stop, and rank 0 saves step 2
    overrides = [*TINY_MODEL, "run.max_steps=6", "run.val_every=2", "run.checkpoint_every=100"]
    proc, out = _torchrun(DDP_SCRIPT, tmp_path, phantom_store, overrides, FAIL_AT=fail_at)
    ranks = [out / "rank0.json", out / "rank1.json"]
    assert all(r.is_file() for r in ranks), proc.stdout[-3000:] + proc.stderr[-3000:]
    failing = int(fail_at.split(":")[1])
    errors = [json.loads(r.read_text()).get("error", "") for r in ranks]
    assert "case_1/image.b2nd changed" in errors[failing], errors
    assert "another rank" in errors[1 - failing] and "prepared again" in errors[1 - failing], errors
    assert "stopped at step 2, " in errors[0] and "--resume" in errors[0], errors
    assert load_checkpoint(out / "checkpoints/latest.pt")["step"] == 2
    weights = [json.loads(r.read_text()).get("weights") for r in ranks]
    assert weights == [None, None]  # fit did not return on either rank


def test_progress_picture_is_redrawn_at_most_once_a_minute_unless_forced(tmp_path):
    from volumefusion.train.logging import RunLogger

    logger = RunLogger(tmp_path, enabled=True)
    logger.log({"step": 1, "loss": 1.0, "lr": 1e-3})
    logger.plot(force=False)
    picture = tmp_path / "progress.png"
    assert picture.is_file()
    picture.unlink()
    logger.log({"step": 2, "loss": 0.9, "lr": 1e-3})
    logger.plot(force=False)  # within the interval: skipped
    assert not picture.exists()
    logger.plot()  # the end of a run always draws
    assert picture.is_file()
    logger.close()


# --------------------------------------------------------------------------------------------------
# non-finite losses and weights: skipped, said, stopped; never saved


def _nan_inputs_at(monkeypatch, steps):
    """The training inputs of the given (1-based) steps become NaN, as a bf16 or diverging forward
    pass makes them; the loss and the gradients follow."""
    from volumefusion.train.tasks import PretrainTask

    make_inputs, calls = PretrainTask.make_inputs, []

    def poisoned(self, batch, generator, device):
        x, y = make_inputs(self, batch, generator, device)
        calls.append(None)
        return (torch.full_like(x, float("nan")) if len(calls) in steps else x), y
    monkeypatch.setattr(PretrainTask, "make_inputs", poisoned)


def _checkpoints_are_finite(folder):
    found = sorted((folder / "checkpoints").glob("*.pt"))
    for path in found:
        assert nonfinite_tensors(load_checkpoint(path)["model"]) == [], path
    return found


def test_a_nonfinite_step_is_skipped_and_said_and_changes_nothing(phantom_store, tmp_path, monkeypatch, caplog):
    _nan_inputs_at(monkeypatch, {2})
    result = pretrain(_cfg("run.max_steps=3", "run.val_every=100", "run.checkpoint_every=1"), phantom_store, tmp_path)
    assert result.step == 3 and result.exit_status == 0
    assert "step 2: the loss (nan) or the gradient norm (nan) is not finite; step skipped" in caplog.text
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert record["step"] == 2 and record["loss"] is None and record["skipped_steps"] == 1
    assert _checkpoints_are_finite(tmp_path)  # normalisation running statistics included


def test_a_diverging_run_stops_with_an_error_and_leaves_no_nonfinite_checkpoint(phantom_store, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(engine, "MAX_NONFINITE_STEPS", 2)
    _nan_inputs_at(monkeypatch, set(range(2, 100)))
    with pytest.raises(VolumeFusionError, match=r"not finite \(NaN or inf\) in 2 steps in a row, steps 2 to 3: "
                                                r"training diverged\. Lower optim\.lr"):
        pretrain(_cfg("run.max_steps=10", "run.val_every=1", "run.checkpoint_every=1"), phantom_store, tmp_path)
    assert _checkpoints_are_finite(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints/latest.pt")["step"] == 2  # not the step that stopped it


def test_weights_that_became_nonfinite_are_never_written(phantom_store, tmp_path, monkeypatch):
    step = engine.Trainer._train_step

    def overflowing(self, data, keep):  # finite gradients, but an optimiser step that overflows
        out = step(self, data, keep)
        next(self.model.parameters()).data.fill_(float("inf"))
        return out
    monkeypatch.setattr(engine.Trainer, "_train_step", overflowing)
    with pytest.raises(VolumeFusionError, match=r"step 1: 1 of \d+ weight tensors hold NaN or infinite values .*"
                                                r"latest.pt not written"):
        pretrain(_cfg("run.max_steps=2", "run.val_every=100", "run.checkpoint_every=1"), phantom_store, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_bf16_on_the_cpu_warns_at_start_up(phantom_store, tmp_path, caplog):
    from volumefusion.data.store import Store
    from volumefusion.train.runs import build_model
    from volumefusion.train.tasks import PretrainTask

    cfg = _cfg("run.precision=bf16")
    task = PretrainTask(cfg, Store.open(phantom_store))
    engine.Trainer(cfg, build_model(cfg, task.num_classes), task, tmp_path)
    assert "run.precision=bf16 on the CPU" in caplog.text and "run.precision=fp32" in caplog.text


# --------------------------------------------------------------------------------------------------
# the store changes under a run


@pytest.mark.parametrize("workers", [0, 1])
def test_a_store_prepared_again_while_a_run_reads_it_stops_the_run_cleanly_with_a_checkpoint(
        tmp_path, monkeypatch, workers):
    from volumefusion.data.phantoms import write_phantoms
    from volumefusion.data.prepare import prepare
    from volumefusion.data.store import StoreChanged
    from volumefusion.train.tasks import PretrainTask

    sources = [str(p) for p in write_phantoms(tmp_path / "raw", seeds=[1, 2], shape=(24, 48, 48))]
    store = tmp_path / "store"
    assert prepare(sources, store).prepared
    make_inputs, calls = PretrainTask.make_inputs, []

    def prepare_again_after_the_first_step(self, batch, generator, device):
        calls.append(None)
        if len(calls) == 2:  # the sources are replaced (another size) and prepared again
            write_phantoms(tmp_path / "raw", seeds=[1, 2], shape=(20, 40, 40))
            assert len(prepare(sources, store).prepared) == 2
        return make_inputs(self, batch, generator, device)
    monkeypatch.setattr(PretrainTask, "make_inputs", prepare_again_after_the_first_step)
    with pytest.raises(StoreChanged) as caught:
        pretrain(_cfg("run.max_steps=20", "run.val_every=100", f"data.workers={workers}"), store, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert "was the store prepared again" in message and "--resume" in message, message
    step = load_checkpoint(tmp_path / "run/checkpoints/latest.pt")["step"]
    assert f"stopped at step {step}," in message and 2 <= step < 20


def test_compile_on_the_cpu_is_refused_before_any_work(phantom_store, tmp_path):
    from volumefusion.train.runs import finetune

    with pytest.raises(VolumeFusionError, match=r"run\.compile=true on the CPU: torch \S+'s compiled CPU code"):
        pretrain(_cfg("run.compile=true"), phantom_store, tmp_path / "run")
    with pytest.raises(VolumeFusionError, match=r"run\.compile=true on the CPU"):  # before preparing any data
        finetune([], [*TINY_MODEL, "run.compile=true"], tmp_path / "nowhere", tmp_path / "run", None)
    assert not (tmp_path / "run").exists()
