"""nnU-Net v2 integration. PCTNetForNNUNet and the plans-file config need no nnU-Net; the rest runs
nnU-Net's own code (skipped without the extra ``volumefusion[nnunet]``): plan and preprocess a phantom
dataset, export Volume Fusion weights (ResEnc from the plans and PCT-Net), build them with nnU-Net's
get_network_from_plans, load them with load_pretrained_weights, train a few iterations with
nnUNetTrainer and predict with nnUNetPredictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL
from volumefusion import VolumeFusionError, config
from volumefusion.integrations.nnunet import PCTNetForNNUNet, pctnet_strides
from volumefusion.nets import PCTNet, deep_supervision_owner

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
    with pytest.raises(VolumeFusionError, match="export with the plans file and configuration it was pretrained with"):
        export_nnunet(resenc, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


def _nnunet_trains(plans_name: str, configuration: str, weights: Path):
    """What ``nnUNetv2_train DATASET CONFIGURATION 0 -p PLANS -pretrained_weights WEIGHTS -device cpu`` does,
    for two iterations: the weights load (every non-segmentation tensor as exported) and the loss, with
    deep supervision, is finite. Returns the trainer, its final checkpoint written."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainer = get_trainer_from_args(str(DATASET_ID), configuration, 0, plans_identifier=plans_name,
                                    device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, False, False, str(weights))
    loaded = torch.load(weights, weights_only=True)["network_weights"]
    state = trainer.network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.items() if ".seg_layers." not in k)
    trainer.on_train_start()
    assert trainer.enable_deep_supervision
    trainer.on_train_epoch_start()
    losses = [trainer.train_step(next(trainer.dataloader_train))["loss"] for _ in range(2)]
    assert np.isfinite(losses).all()
    trainer.on_train_end()
    return trainer


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

    conf = config.plans_configuration(result.plans, result.configuration)
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
def test_exported_weights_load_train_and_predict_in_nnunet(nnunet_dirs, tmp_path):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from volumefusion.integrations.nnunet import export_nnunet

    dirs, plans_file = nnunet_dirs
    out = dirs["nnUNet_preprocessed"] / DATASET
    resenc = _checkpoint(tmp_path / "resenc.pt", ["model.name=nnunet", f"model.plans={plans_file}"])
    pctnet = _checkpoint(tmp_path / "pctnet.pt", [])
    results = [export_nnunet(resenc, plans_file, out), export_nnunet(pctnet, plans_file, out)]
    assert [r.configuration for r in results] == ["3d_fullres_volumefusion", "3d_fullres_pctnet"]
    assert results[0].plans == results[1].plans  # one plans variant holds both
    for result, ckpt in zip(results, (resenc, pctnet)):
        _check_export(result, torch.load(ckpt, weights_only=True)["model"])

    plans_name = results[0].plans_name
    preprocess([DATASET_ID], plans_name, [r.configuration for r in results], num_processes=[1])
    trainers = [_nnunet_trains(plans_name, r.configuration, r.weights) for r in results]

    # nnUNetv2_predict with the PCT-Net fine-tuned in nnU-Net
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(Path(trainers[1].output_folder).parent), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    image = sorted((dirs["nnUNet_raw"] / DATASET / "imagesTr").iterdir())[-1]
    array, properties = SimpleITKIO().read_images([str(image)])  # in this process: no worker pool to start
    prediction = predictor.predict_single_npy_array(array, properties)
    assert prediction.shape == (24, 48, 48)
