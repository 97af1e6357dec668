"""nnU-Net v2 integration. PCTNetForNNUNet and the plans-file config need no nnU-Net; the rest runs
nnU-Net's own code (skipped without the extra ``volumefusion[nnunet]``): plan and preprocess a phantom
dataset, export Volume Fusion weights (ResEnc from the plans and PCT-Net), build them with nnU-Net's
get_network_from_plans, load them with load_pretrained_weights, and fine-tune them with the real
``nnUNetv2_train -pretrained_weights`` command (one tiny epoch and nnU-Net's validation)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL
from volumefusion import VolumeFusionError, config
from volumefusion.integrations.nnunet import PCTNetForNNUNet, pctnet_strides
from volumefusion.integrations.nnunet.export import SEG_KEY
from volumefusion.nets import PCTNet, deep_supervision_owner
from volumefusion.nnunet_plans import plans_configuration

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID:03d}_Phantom"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def _write_raw_dataset(raw: Path, seeds) -> Path:
    """Labelled phantoms in nnU-Net v2's raw format (imagesTr/<case>_0000.nii.gz, labelsTr, dataset.json)."""
    from volumefusion.data.phantoms import LABEL_NAMES, write_phantoms

    root = raw / DATASET
    images = write_phantoms(root / "tmp", seeds=seeds, with_labels=True, shape=(24, 48, 48))
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for image in images:
        case = image.name.removesuffix(".nii.gz")
        image.rename(root / "imagesTr" / f"{case}_0000.nii.gz")
        (root / "tmp" / "labels" / image.name).rename(root / "labelsTr" / image.name)
    dataset = {"channel_names": {"0": "CT"}, "labels": {v: k for k, v in LABEL_NAMES.items()},
               "numTraining": len(images), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory):
    """nnU-Net's three folders with the phantom dataset planned and preprocessed (3d_fullres, tiny ResEnc)."""
    pytest.importorskip("nnunetv2")
    pytest.importorskip("dynamic_network_architectures")
    root = tmp_path_factory.mktemp("nnunet")
    dirs = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    mp = pytest.MonkeyPatch()
    for name, d in dirs.items():
        mp.setenv(name, str(d))
    mp.setenv("nnUNet_compile", "f")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )

    _write_raw_dataset(dirs["nnUNet_raw"], seeds=[21, 22, 23])
    extract_fingerprints([DATASET_ID], num_processes=1, verbose=False)
    plan_experiments([DATASET_ID], "nnUNetPlannerResEncM")
    mp.setenv("nnUNet_n_proc_DA", "0")  # training augments in this process (the planner needs >= 1)
    pre = dirs["nnUNet_preprocessed"] / DATASET
    plans_file = pre / "nnUNetResEncUNetMPlans.json"
    # a tiny ResEnc: few features and blocks, so CPU iterations take a second
    plans = json.loads(plans_file.read_text())
    conf = plans["configurations"]["3d_fullres"]
    kwargs = conf["architecture"]["arch_kwargs"]
    stages = kwargs["n_stages"]
    kwargs["features_per_stage"] = [min(4 * 2**i, 32) for i in range(stages)]
    kwargs["n_blocks_per_stage"] = [1] * stages
    kwargs["n_conv_per_stage_decoder"] = [1] * (stages - 1)
    conf["batch_size"] = 2
    plans_file.write_text(json.dumps(plans, indent=1))
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in (dirs["nnUNet_raw"] / DATASET / "imagesTr").iterdir())
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:2], "val": cases[2:]}]))
    yield dirs, plans_file
    mp.undo()


TINY_PCT = {"feature_channels": (4, 8, 16, 32, 64), "num_heads": (2, 4, 8), "window_size": 2}


def test_pctnet_for_nnunet_is_pctnet_with_nnunets_names_and_switch():
    torch.manual_seed(0)
    ours = PCTNet(num_classes=5, **TINY_PCT)
    theirs = PCTNetForNNUNet(input_channels=1, num_classes=5, deep_supervision=True,
                             strides=pctnet_strides(1), **TINY_PCT)
    renamed = dict(theirs.renamed_prefixes)
    mapped = {}
    for key in ours.state_dict():
        prefix = next((p for p in renamed if key.startswith(p)), None)
        mapped[key] = renamed[prefix] + key[len(prefix):] if prefix else key
    assert sorted(mapped.values()) == sorted(theirs.state_dict())
    seg = [k for k in theirs.state_dict() if ".seg_layers." in k]
    assert len(seg) == 8 and all(k.endswith((".weight", ".bias")) for k in seg)  # the four 1x1x1 convs only

    theirs.load_state_dict({mapped[k]: v for k, v in ours.state_dict().items()})
    ours.eval(), theirs.eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b)
        theirs.decoder.deep_supervision = False  # how nnU-Net switches it
        assert isinstance(theirs(x), torch.Tensor)
    assert deep_supervision_owner(theirs) is theirs


def test_pctnet_strides_give_nnunets_scales_of_the_four_outputs():
    net = PCTNetForNNUNet(1, 3, True, strides=pctnet_strides(1), **TINY_PCT)
    scales = 1 / np.cumprod(pctnet_strides(1), axis=0)[:-1]  # nnU-Net's deep-supervision scales
    with torch.no_grad():
        outputs = net.eval()(torch.zeros(1, 1, 16, 32, 32))
    assert [list(o.shape[2:]) for o in outputs] == [[int(n) for n in s * (16, 32, 32)] for s in scales]
    with pytest.raises(ValueError, match="do not match PCT-Net's down-sampling"):
        PCTNetForNNUNet(1, 3, True, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], **TINY_PCT)


def _plans_file(path: Path) -> Path:
    """A minimal plans file: configuration 3d_fullres and 3d_small inheriting from it with another patch."""
    arch = {"network_class_name": RESENC, "arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2]]}, "_kw_requires_import": []}
    plans = {"plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"patch_size": [32, 64, 48], "spacing": [2.0, 1.0, 1.0], "architecture": arch},
        "3d_small": {"inherits_from": "3d_fullres", "patch_size": [16, 32, 32]},
        "2d": {"patch_size": [64, 48], "architecture": arch}}}
    path.write_text(json.dumps(plans))
    return path


def test_nnunet_model_config_names_the_plans_and_takes_their_patch(tmp_path):
    plans = _plans_file(tmp_path / "nnUNetPlans.json")
    assert config.load(overrides=["model.name=nnunet", f"model.plans={plans}"]).data.crop_size == (32, 64, 48)
    small = config.load(overrides=["model.name=nnunet", f"model.plans={plans}", "model.configuration=3d_small"])
    assert small.data.crop_size == (16, 32, 32)  # inherited architecture, own patch
    given = config.load(overrides=["model.name=nnunet", f"model.plans={plans}", "data.crop_size=[8,16,16]"])
    assert given.data.crop_size == (8, 16, 16)
    with pytest.raises(config.ConfigError, match="model.plans: model.name nnunet"):
        config.load(overrides=["model.name=nnunet"])
    with pytest.raises(config.ConfigError, match="model.configuration: '3d_lowres' is not in"):
        config.load(overrides=["model.name=nnunet", f"model.plans={plans}", "model.configuration=3d_lowres"])
    with pytest.raises(config.ConfigError, match="not a 3D configuration"):
        config.load(overrides=["model.name=nnunet", f"model.plans={plans}", "model.configuration=2d"])


def _pretrain(tmp_path: Path, phantom_store: Path, overrides: list[str]) -> Path:
    """A checkpoint of 2 Volume Fusion steps; an nnU-Net model crops the plans' patch size."""
    from volumefusion.train.runs import pretrain

    tiny = [o for o in TINY_MODEL if not ("model.name=nnunet" in overrides and o.startswith("data.crop_size"))]
    cfg = config.load(overrides=tiny + ["run.max_steps=2", "run.val_every=100", "run.checkpoint_every=100",
                                              "run.image_every=100"] + overrides)
    pretrain(cfg, phantom_store, tmp_path)
    return tmp_path / "checkpoints" / "latest.pt"


@pytest.mark.slow
def test_nnunet_model_pretrains_with_the_plans_patch_and_records_the_window(nnunet_dirs, phantom_store, tmp_path):
    _, plans_file = nnunet_dirs
    patch = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["patch_size"]
    cfg = config.load(overrides=["model.name=nnunet", f"model.plans={plans_file}"])
    assert list(cfg.data.crop_size) == patch
    ckpt_path = _pretrain(tmp_path, phantom_store, ["model.name=nnunet", f"model.plans={plans_file}"])
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["config"]["data"]["hu_window"] == [-1000.0, 1000.0]
    assert ckpt["config"]["data"]["crop_size"] == patch
    assert any(".seg_layers." in k for k in ckpt["model"])


def test_export_refuses_what_nnunet_cannot_hold(nnunet_dirs, tmp_path, capsys):
    _, plans_file = nnunet_dirs
    from volumefusion.cli import main
    from volumefusion.integrations.nnunet import export_nnunet

    unet = _checkpoint(tmp_path / "unet.pt", ["model.name=unet"])
    argv = ["export", "nnunet", "--checkpoint", str(unet), "--plans", str(plans_file), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "model.name 'unet' has no nnU-Net counterpart" in capsys.readouterr().err
    two_channels = json.loads(plans_file.read_text())
    two_channels["foreground_intensity_properties_per_channel"]["1"] = {}
    other = tmp_path / "plans2.json"
    other.write_text(json.dumps(two_channels))
    pct = _checkpoint(tmp_path / "pct.pt", [])
    with pytest.raises(VolumeFusionError, match="2 input channels"):
        export_nnunet(pct, other, tmp_path / "out")
    resenc = _checkpoint(tmp_path / "resenc.pt", ["model.name=nnunet", f"model.plans={plans_file}"])
    wider = json.loads(plans_file.read_text())
    kwargs = wider["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [2 * f for f in kwargs["features_per_stage"]]
    other.write_text(json.dumps(wider))
    with pytest.raises(VolumeFusionError, match="export with the plans file and configuration it was pretrained with") \
            as refused:
        export_nnunet(resenc, other, tmp_path / "out")
    assert f"pretrained from {plans_file}," in str(refused.value)  # the checkpoint's plans, not --plans
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# export nnunet: bad plans files, earlier exports in --out (PCT-Net: no nnU-Net needed)


def _ct_plans(path: Path) -> Path:
    """A plans file of a one-channel CT dataset, with what the export reads of nnU-Net v2's."""
    arch = {"network_class_name": RESENC, "arch_kwargs": {"strides": [[1, 1, 1], [2, 2, 2]]}, "_kw_requires_import": []}
    intensity = {"mean": 40.0, "std": 200.0, "percentile_00_5": -1000.0, "percentile_99_5": 1200.0, "min": -1024.0,
                 "max": 3000.0, "median": 30.0}
    plans = {"plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {"0": intensity},
             "configurations": {"3d_fullres": {
                 "patch_size": [16, 32, 32], "spacing": [2.0, 1.5, 1.5], "batch_size": 2,
                 "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "architecture": arch}}}
    path.write_text(json.dumps(plans, indent=1))
    return path


def bad_plans(folder: Path) -> dict[str, tuple[Path, str]]:
    """Plans files ``export nnunet`` must refuse: ``{name: (path, phrase its one line must hold)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = json.loads(_ct_plans(folder / "good.json").read_text())
    edits = {
        "truncated": ("is not a readable nnU-Net plans file", None),
        "a list": ("the file holds a list", lambda p: [p]),
        "configurations as a list": ("'configurations' is a list",
                                     lambda p: {**p, "configurations": list(p["configurations"].values())}),
        "configuration as a string": ("configuration '3d_fullres' is a string",
                                      lambda p: {**p, "configurations": {"3d_fullres": "3d"}}),
        "inherits_from a missing one": ("inherits_from '3d_base', which is not in the file",
                                        lambda p: _conf(p, inherits_from="3d_base")),
        "inherits from itself": ("inherits from itself (3d_fullres -> 3d_fullres)",
                                 lambda p: _conf(p, inherits_from="3d_fullres")),
        "patch_size a string": ('patch_size "128" is not three positive whole numbers',
                                lambda p: _conf(p, patch_size="128")),
        "patch_size fractions": ("patch_size [16.5, 32, 32] is not three positive whole numbers",
                                 lambda p: _conf(p, patch_size=[16.5, 32, 32])),
        "spacing a string": ('spacing "2x1.5x1.5" is not three positive', lambda p: _conf(p, spacing="2x1.5x1.5")),
        "architecture without arch_kwargs": ("its architecture needs 'network_class_name'",
                                             lambda p: _conf(p, architecture={"network_class_name": RESENC})),
        "2d": ("is not a 3D configuration", lambda p: _conf(p, patch_size=[64, 48])),
        "intensities as a list": ("foreground_intensity_properties_per_channel is a list",
                                  lambda p: {**p, "foreground_intensity_properties_per_channel": [{}]}),
        "intensities of channel 1": ("under '1', not \"0\"", lambda p: {
            **p, "foreground_intensity_properties_per_channel": {"1": {}}}),
        "two channels": ("the dataset has 2 input channels", lambda p: {
            **p, "foreground_intensity_properties_per_channel": {"0": {}, "1": {}}}),
        "not CT": ("not as CT", lambda p: _conf(p, normalization_schemes=["ZScoreNormalization"])),
    }
    files = {}
    for name, (phrase, edit) in edits.items():
        path = folder / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(edit(good)) if edit else json.dumps(good)[:60])
        files[name] = (path, phrase)
    return files


def _conf(plans: dict, **changes) -> dict:
    """``plans`` with configuration 3d_fullres changed (``None`` removes an entry)."""
    conf = {**plans["configurations"]["3d_fullres"], **changes}
    return {**plans, "configurations": {"3d_fullres": {k: v for k, v in conf.items() if v is not None}}}


@pytest.fixture(scope="module")
def pct_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny PCT-Net pretraining checkpoints with different weights."""
    folder = tmp_path_factory.mktemp("pct")
    first = _checkpoint(folder / "first.pt", [])
    ckpt = torch.load(first, weights_only=True)
    from volumefusion.checkpoint import save_checkpoint

    save_checkpoint(folder / "second.pt", {**ckpt, "model": {k: v + 1 if v.is_floating_point() else v
                                                             for k, v in ckpt["model"].items()}})
    return first, folder / "second.pt"


def _export(checkpoint: Path, plans: Path, out: Path, *options: str) -> list[str]:
    return ["-q", "export", "nnunet", "--checkpoint", str(checkpoint), "--plans", str(plans), "--out", str(out),
            *options]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("volumefusion export: error: "), err
    return err


def test_export_refuses_every_bad_plans_file_in_one_line_naming_it(pct_checkpoints, tmp_path, capsys):
    from volumefusion.cli import main

    for name, (path, phrase) in bad_plans(tmp_path / "plans").items():
        assert main(_export(pct_checkpoints[0], path, tmp_path / "out")) == 2, name
        err = _one_line_error(capsys)
        assert str(path) in err and phrase in err, (name, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["{\"configurations\": {", "[]", "{\"configurations\": [], "
                                    "\"foreground_intensity_properties_per_channel\": {}}",
                                    "{\"configurations\": {\"3d_fullres_pctnet\": 4}, "
                                    "\"foreground_intensity_properties_per_channel\": {}}"])
def test_export_refuses_a_damaged_plans_variant_in_out_and_leaves_it(pct_checkpoints, tmp_path, capsys, damage):
    from volumefusion.cli import main

    plans, out = _ct_plans(tmp_path / "nnUNetPlans.json"), tmp_path / "out"
    out.mkdir()
    variant = out / "nnUNetPlans_volumefusion.json"
    variant.write_text(damage)
    assert main(_export(pct_checkpoints[0], plans, out)) == 2
    err = _one_line_error(capsys)
    assert f"{variant}: the plans variant of an earlier export cannot be read" in err and "--plans-name" in err
    assert variant.read_text() == damage and sorted(out.iterdir()) == [variant]


def test_a_re_export_is_refused_without_force_and_force_keeps_the_edited_batch_size(pct_checkpoints, tmp_path,
                                                                                   capsys):
    from volumefusion.cli import main

    first, second = pct_checkpoints
    plans, out = _ct_plans(tmp_path / "nnUNetPlans.json"), tmp_path / "out"
    assert main(_export(first, plans, out)) == 0
    variant_path = out / "nnUNetPlans_volumefusion.json"
    weights = out / "nnUNetPlans_volumefusion_3d_fullres_pctnet.pth"
    variant = json.loads(variant_path.read_text())
    variant["configurations"]["3d_fullres_pctnet"]["batch_size"] = 1  # as the user guide suggests for PCT-Net
    variant_path.write_text(json.dumps(variant))
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert main(_export(second, plans, out)) == 2
    err = _one_line_error(capsys)
    assert str(out) in err and "nnUNetPlans_volumefusion_3d_fullres_pctnet.pth" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert main(_export(second, plans, out, "--force")) == 0
    assert "note: kept batch_size 1" in capsys.readouterr().out
    assert json.loads(variant_path.read_text())["configurations"]["3d_fullres_pctnet"]["batch_size"] == 1
    assert main(_export(second, plans, tmp_path / "fresh")) == 0
    replaced, fresh = (torch.load(folder / weights.name, weights_only=True)["network_weights"] for folder in
                       (out, tmp_path / "fresh"))
    assert replaced.keys() == fresh.keys() and all(torch.equal(replaced[k], fresh[k]) for k in fresh)

    assert main(_export(first, plans, out, "--name", "3d_fullres_pctnet_first")) == 0  # beside it
    configurations = json.loads(variant_path.read_text())["configurations"]
    assert list(configurations) == ["3d_fullres_pctnet", "3d_fullres_pctnet_first"]
    assert (out / "nnUNetPlans_volumefusion_3d_fullres_pctnet_first.pth").is_file()


def test_a_second_hu_window_is_exported_into_a_variant_of_its_own(pct_checkpoints, tmp_path, capsys):
    from volumefusion.cli import main

    plans, out = _ct_plans(tmp_path / "nnUNetPlans.json"), tmp_path / "out"
    assert main(_export(pct_checkpoints[0], plans, out)) == 0
    narrow = _checkpoint(tmp_path / "narrow.pt", ["data.hu_window=[-500,500]"])
    capsys.readouterr()
    assert main(_export(narrow, plans, out)) == 2
    err = _one_line_error(capsys)
    variant = out / "nnUNetPlans_volumefusion.json"
    assert f"{variant}: holds 3d_fullres_pctnet normalised with HU window [-1000.0, 1000.0]" in err
    assert err.endswith("--plans-name nnUNetPlans_volumefusion_hu-500to500")

    assert main(_export(narrow, plans, out, "--plans-name", "nnUNetPlans_volumefusion_hu-500to500")) == 0
    windows = {p.name: [json.loads(p.read_text())["foreground_intensity_properties_per_channel"]["0"][k]
                        for k in ("percentile_00_5", "percentile_99_5")] for p in out.glob("*.json")}
    assert windows == {"nnUNetPlans_volumefusion.json": [-1000.0, 1000.0],
                       "nnUNetPlans_volumefusion_hu-500to500.json": [-500.0, 500.0]}
    assert "-p nnUNetPlans_volumefusion_hu-500to500" in capsys.readouterr().out
    for name, phrase in [("nnUNetPlans", "would replace --plans"), ("a/b", "use letters, digits"),
                         ("x__y", "no '__'")]:
        assert main(_export(narrow, plans, tmp_path, "--plans-name", name, "--force")) == 2
        assert phrase in _one_line_error(capsys)


def test_a_failed_export_leaves_the_earlier_one_whole(pct_checkpoints, tmp_path, capsys, monkeypatch):
    from volumefusion.cli import main

    plans, out = _ct_plans(tmp_path / "nnUNetPlans.json"), tmp_path / "out"
    assert main(_export(pct_checkpoints[0], plans, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(path, *args, **kwargs):  # the plans variant, written after the weights
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(_export(pct_checkpoints[1], plans, out, "--force")) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"volumefusion export: error: {out / 'nnUNetPlans_volumefusion.json'}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new weights, no temporaries


def test_export_to_a_full_disk_says_so_in_one_line(pct_checkpoints, small_disk, tmp_path, capsys):
    from volumefusion.cli import main

    plans = _ct_plans(tmp_path / "nnUNetPlans.json")
    (small_disk / "filler").write_bytes(bytes(396 * 1024))
    assert main(_export(pct_checkpoints[0], plans, small_disk / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and str(small_disk / "out") in err, err
    assert not list((small_disk / "out").iterdir())  # nothing half-written


def test_export_names_the_checkpoint_whose_config_is_not_volumefusions(tmp_path, capsys):
    from volumefusion.checkpoint import save_checkpoint
    from volumefusion.cli import main

    foreign = tmp_path / "monai.pt"
    save_checkpoint(foreign, {"model": {"w": torch.zeros(2)}, "config": {"network": {"name": "SwinUNETR"}}})
    assert main(_export(foreign, _ct_plans(tmp_path / "nnUNetPlans.json"), tmp_path / "out")) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"volumefusion export: error: {foreign}: its config is not a volumefusion one") and \
        "network" in err


@pytest.mark.parametrize("timm_import", ["raise RuntimeError('operator torchvision::nms does not exist')", ""])
def test_export_says_when_nnunetv2_train_can_use_its_default_trainer_only(pct_checkpoints, tmp_path, monkeypatch,
                                                                        timm_import):
    """nnU-Net finds a trainer by importing its trainers; the Primus ones import timm, timm imports
    torchvision, and a torchvision built for another torch fails (as PyPI's beside a CPU torch)."""
    from volumefusion.integrations.nnunet import export_nnunet

    (tmp_path / "site" / "timm").mkdir(parents=True)
    (tmp_path / "site" / "timm" / "__init__.py").write_text(timm_import)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    try:
        notes = export_nnunet(pct_checkpoints[0], _ct_plans(tmp_path / "nnUNetPlans.json"), tmp_path / "out").notes
    finally:
        sys.modules.pop("timm", None)  # the stand-in; monkeypatch puts back a timm imported before
    found = [n for n in notes if "default trainer" in n]
    if timm_import:
        assert len(found) == 1 and "operator torchvision::nms does not exist" in found[0]
        assert f"pip install torchvision==0.{int(torch.__version__.split('.')[1]) + 15}" in found[0]
    else:
        assert not found


def _checkpoint(path: Path, overrides: list[str]) -> Path:
    """A volumefusion pretraining checkpoint of a freshly built network (weights unlike nnU-Net's init)."""
    from volumefusion.checkpoint import save_checkpoint
    from volumefusion.train.runs import build_model

    cfg = config.load(overrides=[o for o in TINY_MODEL if not o.startswith("data.crop_size")] + overrides
                      + ["run.seed=7"])
    model = build_model(cfg, cfg.fusion.num_classes)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(),
                           "task": {"kind": "pretrain", "num_classes": cfg.fusion.num_classes}})
    return path


ENV = Path(__file__).parent / "nnunet_env"  # a short trainer for nnUNetv2_train, and what CI needs (README there)
SMOKE_TRAINER = "nnUNetTrainer_VFSmoke"


def _nnunetv2_train(dirs: dict[str, Path], result) -> Path:
    """Run ``nnUNetv2_train DATASET CONFIGURATION 0 -tr nnUNetTrainer_VFSmoke -p PLANS -pretrained_weights
    WEIGHTS -device cpu`` as a user does (one epoch of two iterations at learning rate 0, then nnU-Net's
    validation: prediction of the held-out case); check that every exported parameter reached the final
    checkpoint unchanged and the validation wrote its Dice. Returns the fold folder."""
    from nnunetv2 import paths

    from volumefusion.integrations.nnunet.export import trainer_search_problem

    if not hasattr(paths, "nnUNet_extTrainer"):
        pytest.skip("this nnunetv2 has no nnUNet_extTrainer (2.7 and later have)")
    command = shutil.which("nnUNetv2_train", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                     os.environ.get("PATH", "")]))
    env = {**os.environ, **{name: str(folder) for name, folder in dirs.items()}, "nnUNet_compile": "f",
           "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": str(ENV / "trainers")}
    if trainer_search_problem():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENV / "hide_primus"), env.get("PYTHONPATH")]))
    run = subprocess.run([command, str(DATASET_ID), result.configuration, "0", "-tr", SMOKE_TRAINER,
                          "-p", result.plans_name, "-pretrained_weights", str(result.weights), "-device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"Loading pretrained weights from file  {result.weights}" in run.stdout
    fold = dirs["nnUNet_results"] / DATASET / f"{SMOKE_TRAINER}__{result.plans_name}__{result.configuration}" / "fold_0"
    # nnU-Net's own checkpoint (numpy scalars in its logs), written by this test: weights_only=False as nnU-Net loads it
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)["network_weights"]
    exported = torch.load(result.weights, weights_only=True)["network_weights"]
    moving = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics move in any step
    kept = [k for k in exported if SEG_KEY not in k and not k.endswith(moving)]
    assert kept and all(torch.equal(final[k], exported[k]) for k in kept)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert np.isfinite(summary["foreground_mean"]["Dice"])
    return fold


def _check_export(result, ours: dict[str, torch.Tensor]) -> None:
    """The exported plans' CT normalisation is the pretraining's; nnU-Net's get_network_from_plans and
    load_pretrained_weights give a network holding our every non-segmentation tensor, with one output
    per deep-supervision scale nnU-Net derives from the plans' strides."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from volumefusion.preprocess import normalise_hu

    variant = json.loads(result.plans.read_text())
    hu = np.linspace(-2000, 3000, 101, dtype=np.float32)[None]
    norm = CTNormalization(False, variant["foreground_intensity_properties_per_channel"]["0"])
    np.testing.assert_allclose(norm.run(hu.copy()), normalise_hu(torch.from_numpy(hu)).numpy(), atol=1e-6)

    conf = plans_configuration(result.plans, result.configuration)
    arch = conf["architecture"]
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, 3, allow_init=True, deep_supervision=True)
    load_pretrained_weights(network, str(result.weights))
    theirs = network.state_dict()
    renames = getattr(network, "renamed_prefixes", ())
    compared = 0
    for key, value in ours.items():
        for a, b in renames:
            key = b + key[len(a):] if key.startswith(a) else key
        if ".seg_layers." not in key:
            assert torch.equal(theirs[key], value), key
            compared += 1
    assert compared == sum(".seg_layers." not in k for k in theirs)
    strides = arch["arch_kwargs"]["strides"]
    assert all(p % d == 0 for p, d in zip(conf["patch_size"], np.prod(strides, axis=0)))
    network.eval()
    with torch.no_grad():
        assert len(network(torch.zeros(1, 1, *conf["patch_size"]))) == len(strides) - 1


@pytest.mark.slow
def test_nnunetv2_train_fine_tunes_from_the_exported_weights(nnunet_dirs, tmp_path):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    from volumefusion.integrations.nnunet import export_nnunet
    from volumefusion.io import read_image

    dirs, plans_file = nnunet_dirs
    out = dirs["nnUNet_preprocessed"] / DATASET
    resenc = _checkpoint(tmp_path / "resenc.pt", ["model.name=nnunet", f"model.plans={plans_file}"])
    pctnet = _checkpoint(tmp_path / "pctnet.pt", [])
    results = [export_nnunet(resenc, plans_file, out), export_nnunet(pctnet, plans_file, out)]
    assert [r.configuration for r in results] == ["3d_fullres_volumefusion", "3d_fullres_pctnet"]
    assert results[0].plans == results[1].plans  # one plans variant holds both
    for result, ckpt in zip(results, (resenc, pctnet)):
        _check_export(result, torch.load(ckpt, weights_only=True)["model"])

    preprocess([DATASET_ID], results[0].plans_name, [r.configuration for r in results], num_processes=[1])
    for result in results:
        fold = _nnunetv2_train(dirs, result)
        prediction, _ = read_image(next((fold / "validation").glob("*.nii.gz")))
        assert prediction.shape == (24, 48, 48)
