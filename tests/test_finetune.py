"""Fine-tuning end to end: pretrained weights load into a new head, from-scratch runs in the same
harness, and on the real chest CT a fine-tuned model predicts on the input's exact grid."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from tests.conftest import TINY_MODEL
from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import load_checkpoint
from volumefusion.cli import main
from volumefusion.io import read_image
from volumefusion.train.runs import finetune, pretrain
from volumefusion.train.tasks import split_cases

FT = [*TINY_MODEL, "run.max_steps=3", "run.val_every=3", "run.checkpoint_every=3"]


@pytest.fixture(scope="module")
def pretrained(phantom_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    pretrain(config.load(overrides=[*TINY_MODEL, "run.max_steps=2", "run.val_every=100"]), phantom_store, out)
    return out / "checkpoints" / "latest.pt"


def test_finetune_from_pretrained_loads_all_but_the_head(pretrained, phantom_dataset, tmp_path):
    result = finetune([], FT, phantom_dataset, tmp_path, pretrained)
    assert result.step == 3 and result.best_score is not None
    report = json.loads((tmp_path / "load_report.json").read_text())
    assert report["loaded"] and report["shape_skipped"]  # 5-class fusion head vs 10 organ classes
    skipped = [key for key, _, _ in report["shape_skipped"]]
    assert skipped and all(key.startswith(tuple(report["head_prefixes"])) for key in skipped)
    assert not report["missing"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert ckpt["task"]["kind"] == "segmentation" and ckpt["task"]["num_classes"] == 10
    assert ckpt["task"]["label_names"]["5"] == "liver"
    assert ckpt["task"]["preprocessing"] == load_checkpoint(pretrained)["task"]["preprocessing"]


def test_finetune_reads_the_pretrained_checkpoint_once_and_returns_its_load_report(pretrained, phantom_dataset,
                                                                                     tmp_path, count_reads):
    reads = count_reads(pretrained)  # the shape check before the data is prepared and the real load share it
    result = finetune([], [*TINY_MODEL, "run.max_steps=1", "run.val_every=100"], phantom_dataset, tmp_path,
                      pretrained)
    assert reads == {"opened": 1, "loaded": 1}
    saved = json.loads((tmp_path / "load_report.json").read_text())
    assert json.loads(json.dumps(result.load_report.to_dict())) == saved


def test_frozen_encoder_keeps_the_pretrained_weights(pretrained, phantom_dataset, tmp_path):
    finetune([], [*TINY_MODEL, "run.max_steps=2", "run.val_every=2", "finetune.freeze_encoder_steps=2"],
             phantom_dataset, tmp_path, pretrained)
    before = load_checkpoint(pretrained)["model"]
    after = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["model"]
    weights = [k for k in after if k.endswith(".weight") and k in before and before[k].shape == after[k].shape]
    encoder = [k for k in weights if k.startswith(("stem.", "pyramid.e2.", "pyramid.e4."))]
    decoder = [k for k in weights if k.startswith(("head.conv0.", "pyramid.d2."))]
    assert encoder and decoder
    assert all(after[k].equal(before[k]) for k in encoder)
    assert not all(after[k].equal(before[k]) for k in decoder)
    # in one process a held encoder gets no gradients (so no Adam state): it costs no backward pass
    optimizer = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["optimizer"]
    stateless = sum(len(g["params"]) for g in optimizer["param_groups"]) - len(optimizer["state"])
    assert stateless >= len(encoder)


def test_finetune_refuses_a_different_intensity_window(pretrained, phantom_dataset, tmp_path):
    with pytest.raises(VolumeFusionError, match="data.hu_window"):
        finetune([], [*FT, "data.hu_window=[-500,500]"], phantom_dataset, tmp_path, pretrained)


def test_finetune_refuses_a_config_that_changes_the_pretrained_architecture(pretrained, phantom_dataset,
                                                                           tmp_path):
    with pytest.raises(VolumeFusionError, match=r"model\.feature_channels: \[4, 8, 16, 32, 64\] -> \[8, 8"):
        finetune([], [*FT, "model.feature_channels=[8,8,16,32,64]"], phantom_dataset, tmp_path, pretrained)
    result = finetune([], [*FT, "model.drop_path=0.0"], phantom_dataset, tmp_path, pretrained)  # regularisation may
    assert result.step == 3
    assert json.loads((tmp_path / "load_report.json").read_text())["source"] == str(pretrained)


def test_finetune_from_scratch_same_harness(phantom_dataset, tmp_path):
    result = finetune([], FT, phantom_dataset, tmp_path, None)
    assert result.step == 3
    assert not (tmp_path / "load_report.json").exists()


def test_chest_ct_finetune_predict_evaluate_keeps_geometry(tmp_path):
    from volumefusion.data.samples import chest_ct, chest_ct_label_names

    image, label = chest_ct()
    dataset = tmp_path / "Task01_Chest"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    shutil.copy(image, dataset / "imagesTr" / "chest.nrrd")
    shutil.copy(label, dataset / "labelsTr" / "chest.nrrd")
    names = {"0": "background", **{str(k): v for k, v in chest_ct_label_names().items() if k}}
    (dataset / "dataset.json").write_text(json.dumps({
        "labels": names, "training": [{"image": "./imagesTr/chest.nrrd", "label": "./labelsTr/chest.nrrd"}]}))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["chest"], "val": ["chest"]}))
    run = tmp_path / "run"
    args = ["finetune", "--data", str(dataset), "--pretrained", "none", "--out", str(run), "--split", str(split),
            "--max-steps", "2"] + [a for o in TINY_MODEL for a in ("--set", o)]
    assert main(args) == 0
    preds = tmp_path / "preds"
    assert main(["predict", "-m", str(run / "checkpoints" / "latest.pt"), "-i", str(image), "-o", str(preds),
                 "--device", "cpu", "--format", "same"]) == 0
    pred, pred_geometry = read_image(next(preds.glob("*.nrrd")))
    ref, ref_geometry = read_image(image)
    assert pred.shape == ref.shape
    assert pred_geometry.spacing_zyx == pytest.approx(ref_geometry.spacing_zyx, abs=1e-12)
    assert pred_geometry.origin == pytest.approx(ref_geometry.origin, abs=1e-9)
    assert pred_geometry.direction == pytest.approx(ref_geometry.direction, abs=1e-12)
    assert set(np.unique(pred)) <= set(map(int, names))
    # a label map evaluated against itself: Dice 1, HD95 0
    gt = tmp_path / "gt"
    gt.mkdir()
    shutil.copy(label, gt / "chest.nrrd")
    out = tmp_path / "metrics.csv"
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--labels", str(dataset / "dataset.json"),
                 "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None
    rows = out.read_text().splitlines()
    header = rows[0].split(",")
    dice, hd95 = header.index("dice"), header.index("hd95")
    values = [r.split(",") for r in rows[1:]]
    assert values and all(float(v[dice]) == 1.0 and float(v[hd95]) == 0.0 for v in values)
    assert summary is None or summary


def test_split_errors_name_the_problem(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("volumefusion"), "propagate", True)  # the CLI's setup() turns it off
    ids = [f"case{i}" for i in range(3)]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["case0", "case1"], "val": []}))
    with pytest.raises(VolumeFusionError, match="must both name cases"):
        split_cases(ids, 5, 0, str(split))
    split.write_text(json.dumps({"train": ["case0", "case1"], "val": ["case1"]}))
    assert split_cases(ids, 5, 0, str(split)) == (["case0", "case1"], ["case1"])
    assert "case1" in caplog.text and "not held-out" in caplog.text
    with pytest.raises(VolumeFusionError, match="only 3 folds"):
        split_cases(ids, 5, 4)
    train, val = split_cases(ids, 5, 2)
    assert sorted(train + val) == ids and not set(train) & set(val)


def test_wrong_settings_fail_before_the_dataset_is_prepared(phantom_dataset, tmp_path):
    with pytest.raises(VolumeFusionError, match="data.crop_size"):
        finetune([], [*FT, "data.crop_size=[16,32,33]"], phantom_dataset, tmp_path, None)
    with pytest.raises(VolumeFusionError, match="--split"):
        finetune([], [*FT, f"finetune.split_file={tmp_path / 'none.json'}"], phantom_dataset, tmp_path, None)
    assert not (tmp_path / "store").exists()


def test_a_run_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"")
    with pytest.raises(VolumeFusionError, match="is a folder.*checkpoints/best.pt"):
        load_checkpoint(tmp_path)


def test_a_pretrained_tensor_that_does_not_fit_stops_finetune_before_any_work(pretrained, phantom_dataset,
                                                                             tmp_path, capsys):
    import torch

    from volumefusion.checkpoint import save_checkpoint

    ckpt = load_checkpoint(pretrained)
    ckpt["model"]["stem.proj.weight"] = torch.zeros(4, 1, 1, 1, 1)  # another kernel size than the config's
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, ckpt)
    args = ["finetune", "--data", str(phantom_dataset), "--pretrained", str(broken), "--out", str(tmp_path / "a"),
            "--max-steps", "1"] + [a for o in FT for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {broken}: 1 pretrained tensor(s)" in err and "stem.proj.weight: [4, 1, 1, 1, 1]" in err
    assert not (tmp_path / "a" / "store").exists()  # refused before the dataset was prepared
    args[args.index(str(tmp_path / "a"))] = str(tmp_path / "b")
    assert main([*args, "--partial-load", "stem.proj"]) == 0
    report = json.loads((tmp_path / "b" / "load_report.json").read_text())
    assert ["stem.proj.weight", [4, 1, 1, 1, 1], [4, 1, 1, 3, 3]] in report["shape_skipped"]
    assert "shape-skipped: stem.proj.weight [4, 1, 1, 1, 1] vs model [4, 1, 1, 3, 3]" in capsys.readouterr().out


def test_resume_refuses_other_training_data(phantom_dataset, tmp_path):
    from volumefusion.data.phantoms import write_msd_dataset

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["phantom_0011", "phantom_0012"], "val": ["phantom_0013"]}))
    run = [*TINY_MODEL, "run.val_every=100", "run.checkpoint_every=1", f"finetune.split_file={split}"]
    finetune([], [*run, "run.max_steps=2"], phantom_dataset, tmp_path / "run", None)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    other = write_msd_dataset(tmp_path / "Task03_Other", seeds=[11, 12, 13, 14], shape=(24, 40, 40))
    with pytest.raises(VolumeFusionError, match="the run trained on other data"):  # same case ids, other scans
        finetune([], [*run, "run.max_steps=3"], other, tmp_path / "other", None, resume=latest)
    split.write_text(json.dumps({"train": ["phantom_0011"], "val": ["phantom_0013"]}))  # the split file edited
    with pytest.raises(VolumeFusionError, match=r"2 training and 1 validation cases; now 1 and 1"):
        finetune([], [*run, "run.max_steps=3"], phantom_dataset, tmp_path / "run", None, resume=True)
    split.write_text(json.dumps({"train": ["phantom_0012", "phantom_0011"], "val": ["phantom_0013"]}))
    assert finetune([], [*run, "run.max_steps=3"], phantom_dataset, tmp_path / "run", None, resume=True).step == 3
