"""``volumefusion predict`` end to end on the real chest CT with a tiny untrained checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volumefusion import config
from volumefusion.checkpoint import save_checkpoint
from volumefusion.cli import main
from volumefusion.data.samples import chest_ct, chest_ct_label_names
from volumefusion.infer import Predictor, sliding_window_inference
from volumefusion.io import Geometry, read_image, write_image
from volumefusion.nets import build_model
from volumefusion.preprocess import PrepareSettings, normalise_hu, preprocess_case, restore_to_original

TINY = ["model.feature_channels=[4,8,16,32,64]", "model.num_heads=[2,4,8]", "model.window_size=2",
        "data.crop_size=[16,32,32]", "data.hu_window=[-900,600]"]
NUM_CLASSES = 8  # background + the 7 segments of the chest CT


def _checkpoint(path, preprocessing: dict, task_extra: dict | None = None):
    cfg = config.load(overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES)
    names = {str(k): v for k, v in chest_ct_label_names().items()}
    task = {"kind": "segmentation", "num_classes": NUM_CLASSES, "label_names": names,
            "preprocessing": preprocessing, **(task_extra or {})}
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "task": task, "step": 0})
    return path


# Resampling to a coarse grid exercises the whole way back (crop, resample, reorient) and keeps the
# sliding window small: the chest CT becomes 34 x 48 x 64 voxels.
COARSE = PrepareSettings(spacing_zyx=(10.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", COARSE.to_dict())


@pytest.fixture(scope="module")
def predicted(checkpoint, tmp_path_factory):
    """Output folder of one predict run on the chest CT, in its own format, with probabilities."""
    out = tmp_path_factory.mktemp("predicted")
    assert _predict("-m", checkpoint, "-i", chest_ct()[0], "-o", out, "--format", "same",
                    "--save-probabilities") == 0
    return out


def _predict(*args) -> int:
    return main(["-q", "predict", *map(str, args)])


def _round_trip_geometry(image_path, suffix, tmp_path):
    """The input's geometry after the file format's own write and read (what any writer can keep)."""
    image, geometry = read_image(image_path)
    write_image(tmp_path / f"round_trip{suffix}", image, geometry)
    return read_image(tmp_path / f"round_trip{suffix}")[1]


def test_output_has_the_input_geometry(predicted, tmp_path):
    image_path, _ = chest_ct()
    labels, geometry = read_image(predicted / "CTChest4.nrrd")
    original = read_image(image_path)[1]
    assert geometry == _round_trip_geometry(image_path, ".nrrd", tmp_path)  # bit for bit
    assert geometry.shape_zyx == original.shape_zyx
    for field in ("spacing_zyx", "origin", "direction"):  # NRRD stores spacing x direction: 1 ulp
        np.testing.assert_allclose(getattr(geometry, field), getattr(original, field), rtol=1e-14, atol=1e-12)
    assert labels.dtype == np.uint8 and labels.max() < NUM_CLASSES


def test_labels_are_the_networks_argmax_after_the_training_preprocessing(checkpoint, predicted):
    image, geometry = read_image(chest_ct()[0])
    model = Predictor.from_checkpoint(checkpoint, "cpu").model
    prepared = preprocess_case(image, geometry, COARSE)
    x = normalise_hu(torch.from_numpy(prepared.image), (-900.0, 600.0))[None, None]
    probs = sliding_window_inference(model, x, (16, 32, 32), NUM_CLASSES)
    expected = restore_to_original(probs.argmax(0).to(torch.uint8).numpy(), prepared.restore)

    labels, _ = read_image(predicted / "CTChest4.nrrd")
    assert (labels == expected).mean() > 0.999  # ties at float rounding may flip a voxel
    assert len(np.unique(labels)) > 1


def test_probability_maps_sum_to_one(predicted):
    labels, _ = read_image(predicted / "CTChest4.nrrd")
    probs = np.stack([read_image(predicted / "probabilities" / f"CTChest4_class{k}.nii.gz")[0]
                      for k in range(NUM_CLASSES)])
    assert probs.dtype == np.uint8 and probs.shape == (NUM_CLASSES, *labels.shape)
    total = probs.astype(int).sum(0)
    assert np.abs(total - 255).max() <= NUM_CLASSES  # each class rounded to 1/255


def test_probability_maps_agree_with_the_labels(predicted):
    labels, _ = read_image(predicted / "CTChest4.nrrd")
    probs = np.stack([read_image(predicted / "probabilities" / f"CTChest4_class{k}.nii.gz")[0]
                      for k in range(NUM_CLASSES)]).astype(int)
    winner = np.take_along_axis(probs, labels[None].astype(np.int64), 0)[0]
    # The label is the most probable class up to uint8 rounding, except near class borders where
    # labels are resampled nearest-neighbour and probabilities linearly.
    assert (winner >= probs.max(0) - 1).mean() > 0.95
    assert len(np.unique(labels)) > 1


def test_a_corrupt_input_is_reported_and_skipped(tmp_path, capsys):
    # Native spacing (no resampling) with large windows and no overlap to keep it quick.
    checkpoint = _checkpoint(tmp_path / "native.pt", PrepareSettings().to_dict())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(chest_ct()[0], inputs / "good.nrrd")
    (inputs / "broken.nii.gz").write_bytes(b"this is not an image" * 10)
    assert _predict("-m", checkpoint, "-i", inputs, "-o", tmp_path / "out", "--patch-size", "16", "64", "64",
                    "--overlap", "0") == 1
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    out = capsys.readouterr().out
    broken = inputs / "broken.nii.gz"
    assert "1 of 2 cases written" in out and f"failed: {broken}: cannot read" in out
    assert f"{broken}: {broken}" not in out  # the path is named once
    # the good case is written, as NIfTI by default, on the input's grid to the header's float32 precision
    _, geometry = read_image(tmp_path / "out" / "good.nii.gz")
    original = read_image(inputs / "good.nrrd")[1]
    assert geometry == _round_trip_geometry(inputs / "good.nrrd", ".nii.gz", tmp_path)
    assert geometry.shape_zyx == original.shape_zyx
    for field in ("spacing_zyx", "origin", "direction"):
        np.testing.assert_allclose(getattr(geometry, field), getattr(original, field), rtol=1e-6, atol=1e-4)


def test_a_symlink_loop_among_the_inputs_is_reported_and_the_rest_predicted(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "native.pt", PrepareSettings().to_dict())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(chest_ct()[0], inputs / "good.nrrd")
    (inputs / "loop.nii.gz").symlink_to("loop.nii.gz")
    assert _predict("-m", checkpoint, "-i", inputs, "-o", tmp_path / "out", "--patch-size", "16", "64", "64",
                    "--overlap", "0") == 1
    assert (tmp_path / "out" / "good.nii.gz").is_file()
    out = capsys.readouterr().out
    assert f"failed: {inputs / 'loop.nii.gz'}: symbolic link loop" in out
    # given directly, and a missing folder: said as they are, not "file not found"
    nowhere = f"{tmp_path}/nowhere/"
    assert _predict("-m", checkpoint, "-i", inputs / "loop.nii.gz", nowhere, "-o", tmp_path / "o2") == 1
    out = capsys.readouterr().out
    assert f"{inputs / 'loop.nii.gz'}: symbolic link loop" in out and f"{nowhere}: folder not found" in out


@pytest.mark.parametrize("problem", ["existing file", "unwritable"])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_is_loaded(tmp_path, capsys, problem,
                                                                             unwritable_folder):
    out = tmp_path / "out.nii.gz" if problem == "existing file" else unwritable_folder / "preds"
    if problem == "existing file":
        out.write_bytes(b"an earlier result")
    # the checkpoint does not exist: the output check comes first, before any expensive step
    assert _predict("-m", tmp_path / "missing.pt", "-i", chest_ct()[0], "-o", out) == 2
    err = capsys.readouterr().err.strip()
    expected = "is a file; -o takes a folder" if problem == "existing file" else "-o folder is not writable"
    assert err.startswith(f"volumefusion predict: error: {out}: ")
    assert expected in err and "\n" not in err


def test_a_checkpoint_without_task_is_refused_with_a_clear_message(tmp_path, capsys):
    path = tmp_path / "weights_only.pt"
    save_checkpoint(path, {"model": {}})
    assert _predict("-m", path, "-i", chest_ct()[0], "-o", tmp_path / "out") == 2
    assert "not a volumefusion checkpoint" in capsys.readouterr().err


def test_a_checkpoint_whose_weights_do_not_fit_names_the_tensor_and_shapes(checkpoint, tmp_path, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"]["stem.proj.weight"] = torch.zeros(4, 1, 1, 1, 1)
    path = tmp_path / "wrong.pt"
    save_checkpoint(path, ckpt)
    assert _predict("-m", path, "-i", chest_ct()[0], "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}: the weights do not fit the network its config describes (1 tensors): stem.proj.weight: " \
           "[4, 1, 1, 1, 1] in the checkpoint vs [4, 1, 1, 3, 3] in the network" in err


def test_a_patch_size_the_network_cannot_take_is_refused(checkpoint, tmp_path, capsys):
    args = ("-m", checkpoint, "-i", chest_ct()[0], "-o", tmp_path, "--patch-size", "16", "32", "30")
    assert _predict(*args) == 2
    assert "size divisor" in capsys.readouterr().err


def test_tta_mirrors_the_axes_fine_tuning_mirrored(checkpoint, tmp_path):
    assert Predictor.from_checkpoint(checkpoint, "cpu", tta=True).tta == (0, 1, 2)  # the default
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["finetune"]["mirror_axes"] = [0, 1]  # a model trained to tell left from right
    save_checkpoint(tmp_path / "no_x.pt", ckpt)
    assert Predictor.from_checkpoint(tmp_path / "no_x.pt", "cpu", tta=True).tta == (0, 1)
    assert Predictor.from_checkpoint(tmp_path / "no_x.pt", "cpu", tta=(2,)).tta == (2,)


SMALL = Geometry((16, 32, 32), (2.0, 1.5, 1.5), (0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def native_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("native") / "native.pt", PrepareSettings().to_dict())


def _small_ct(seed: int = 0) -> np.ndarray:
    """int16 HU ``SMALL.shape_zyx``: a soft-tissue cylinder in air, one training crop in size."""
    _, y, x = np.indices(SMALL.shape_zyx)
    body = (y - 16) ** 2 + (x - 16) ** 2 < 12 ** 2
    noise = np.random.default_rng(seed).normal(0, 20, SMALL.shape_zyx)
    return (np.where(body, 40, -1000) + noise).astype(np.int16)


def test_an_output_that_would_overwrite_an_input_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "scans"
    write_image(folder / "ct.nii.gz", _small_ct(), SMALL)
    before = (folder / "ct.nii.gz").read_bytes()
    # the checkpoint does not exist: the refusal comes before it would be loaded
    assert _predict("-m", tmp_path / "missing.pt", "-i", folder, "-o", folder) == 2
    assert "would overwrite this input" in capsys.readouterr().err
    assert (folder / "ct.nii.gz").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["ct.nii.gz"]


def test_channel_picks_one_volume_of_a_4d_image(native_checkpoint, tmp_path, capsys):
    volumes = np.stack([_small_ct(0), _small_ct(1)])
    sitk.WriteImage(sitk.GetImageFromArray(volumes, isVector=False), str(tmp_path / "fourd.nii.gz"))
    assert _predict("-m", native_checkpoint, "-i", tmp_path / "fourd.nii.gz", "-o", tmp_path / "out") == 1
    assert "--channel" in capsys.readouterr().out
    assert _predict("-m", native_checkpoint, "-i", tmp_path / "fourd.nii.gz", "-o", tmp_path / "out",
                    "--channel", "1") == 0
    labels, geometry = read_image(tmp_path / "out" / "fourd.nii.gz")
    assert geometry.shape_zyx == SMALL.shape_zyx
    write_image(tmp_path / "second.nii.gz", _small_ct(1), SMALL)  # the same volume as a 3D file
    assert _predict("-m", native_checkpoint, "-i", tmp_path / "second.nii.gz", "-o", tmp_path / "out") == 0
    np.testing.assert_array_equal(labels, read_image(tmp_path / "out" / "second.nii.gz")[0])


def test_inputs_sharing_a_name_get_the_folder_prefixed_names_prepare_gives_them(native_checkpoint, tmp_path):
    from volumefusion.data.prepare import prepare

    for site in ("s1", "s2"):
        write_image(tmp_path / "dup" / site / "x" / "case.nii.gz", _small_ct(), SMALL)
    assert _predict("-m", native_checkpoint, "-i", tmp_path / "dup", "-o", tmp_path / "out") == 0
    summary = prepare([str(tmp_path / "dup")], tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{c}.nii.gz" for c in sorted(summary.prepared)]
