"""Every command over one catalogue of bad inputs and bad outputs.

Each bad item ends in a non-zero exit or a skip, with one line naming the file and the problem;
never a traceback (``main`` returns instead of raising), never a half-written output (no temporary
files left, no output for a bad case), and the good input beside it still lands. Batch commands
(prepare, predict, show, finetune's preparation) skip a bad case and go on; evaluate and convert
refuse the run, since a summary over some of the cases would mislead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import re
import resource
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import CONFORMANCE, TINY_MODEL, write_bad_checkpoints, write_ct_plans
from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import save_checkpoint
from volumefusion.cli import main
from volumefusion.io import Geometry, write_image
from volumefusion.nets import build_model
from volumefusion.preprocess import PrepareSettings

SHAPE = (16, 32, 32)
GEOMETRY = Geometry(SHAPE, (2.0, 1.5, 1.5), (0.0, 0.0, 0.0))
LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def _ct(seed: int) -> np.ndarray:
    """int16 HU: air around an elliptic body."""
    rng = np.random.default_rng(seed)
    _, y, x = np.indices(SHAPE)
    body = ((y - 16) / 11) ** 2 + ((x - 16) / 12) ** 2 < 1
    return (np.where(body, 40.0, -1000.0) + rng.normal(0, 10, SHAPE)).astype(np.int16)


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[5:10, 12:20, 12:20] = 1
    label[6:8, 14:16, 14:16] = 2
    return label


# --------------------------------------------------------------------------------------------------
# the catalogue


def bad_images(folder: Path) -> dict[str, str]:
    """Bad image files written into ``folder``: ``{file name: phrase its one line must hold}``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _ct(0)
    bad = {}
    (folder / "corrupt.nii.gz").write_bytes(b"\x00garbage" * 50)
    bad["corrupt.nii.gz"] = "cannot read image"
    write_image(folder / "truncated.nii.gz", good, GEOMETRY)
    data = (folder / "truncated.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    bad["truncated.nii.gz"] = "truncated"
    (folder / "empty.nii.gz").write_bytes(b"")
    bad["empty.nii.gz"] = "file is empty"
    write_image(folder / "short.mhd", good, GEOMETRY, compress=False)  # the data file beside it cut short
    raw = folder / "short.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    bad["short.mhd"] = "truncated data file short.raw: 100 bytes, the header needs 32768"
    sitk.WriteImage(sitk.GetImageFromArray(good[0]), str(folder / "flat.nrrd"))
    bad["flat.nrrd"] = "2D image"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([good, good]), isVector=False), str(folder / "fourd.nii.gz"))
    bad["fourd.nii.gz"] = "4D image with 2 volumes"
    nan = good.astype(np.float32)
    nan[1, 2, 3] = np.nan
    write_image(folder / "nan.nii.gz", nan, GEOMETRY)
    bad["nan.nii.gz"] = "1 voxels are NaN or infinite"
    write_image(folder / "nan_spacing.nii.gz", good, GEOMETRY)  # ITK would assume 1 mm without a word
    header = bytearray(gzip.decompress((folder / "nan_spacing.nii.gz").read_bytes()))
    header[80:84] = struct.pack("<f", float("nan"))  # pixdim[1]
    header[252:256] = bytes(4)  # qform_code and sform_code 0
    (folder / "nan_spacing.nii.gz").write_bytes(gzip.compress(bytes(header)))
    bad["nan_spacing.nii.gz"] = "its header's voxel size (pixdim[1:4]) is [nan,"
    (folder / "loop.nii.gz").symlink_to("loop.nii.gz")
    bad["loop.nii.gz"] = "symbolic link loop"
    (folder / "dangling.nii.gz").symlink_to("gone.nii.gz")
    bad["dangling.nii.gz"] = "symbolic link to a missing gone.nii.gz"
    if os.geteuid() != 0:  # root reads anything
        write_image(folder / "unreadable.nii.gz", good, GEOMETRY)
        (folder / "unreadable.nii.gz").chmod(0)
        bad["unreadable.nii.gz"] = "Permission denied"
    return bad


def bad_labels(folder: Path) -> dict[str, tuple[np.ndarray, Geometry, str]]:
    """Label maps that do not fit their image (a good ``_ct`` on ``GEOMETRY``):
    ``{case: (array, geometry, phrase)}``."""
    label = _label()
    moved = dataclasses.replace
    return {
        "size": (label[:, :-2], moved(GEOMETRY, shape_zyx=(16, 30, 32)), "shape_zyx (16, 30, 32) vs the image's"),
        "spacing": (label, moved(GEOMETRY, spacing_zyx=(2.0, 1.2, 1.5)), "spacing_zyx (2, 1.2, 1.5) vs"),
        "origin": (label, moved(GEOMETRY, origin=(0.0, 4.0, 0.0)), "origin (0, 4, 0) vs"),
        "direction": (label, moved(GEOMETRY, direction=(1, 0, 0, 0, 0, 1, 0, 1, 0)), "direction (1, 0, 0, 0, 0"),
        "values": (np.where(label == 2, 7, label).astype(np.uint8), GEOMETRY, "label values [7] are not in"),
        "fractional": (label + np.float32(0.5), GEOMETRY, "non-integer values"),
    }


def _write_good(images: Path, labels: Path | None, names: list[str]) -> None:
    for seed, name in enumerate(names):
        write_image(images / f"{name}.nii.gz", _ct(seed), GEOMETRY)
        if labels is not None:
            write_image(labels / f"{name}.nii.gz", _label(), GEOMETRY)


def _temporaries(folder: Path) -> list[Path]:
    """Files an interrupted atomic write would leave (``.NAME.XXXX.tmp...``)."""
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def _lines_naming(text: str, path: Path | str) -> list[str]:
    return [line for line in text.splitlines() if str(path) in line]


def _check_one_line_each(text: str, folder: Path, bad: dict[str, str]) -> None:
    for name, phrase in bad.items():
        lines = _lines_naming(text, folder / name)
        assert len(lines) == 1 and phrase in lines[0], (name, lines)


# --------------------------------------------------------------------------------------------------
# batch commands skip each bad input and keep the good ones


def test_prepare_skips_every_bad_image_and_label_and_stores_the_good_ones(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    bad = bad_images(images)
    labels.mkdir()
    _write_good(images, labels, ["good"])
    for name in bad:  # a good label for each bad image: the image's own problem is what is reported
        write_image(labels / (name.split(".")[0] + ".nii.gz"), _label(), GEOMETRY)
    for case, (array, geometry, _) in bad_labels(labels).items():
        write_image(images / f"label_{case}.nii.gz", _ct(1), GEOMETRY)
        write_image(labels / f"label_{case}.nii.gz", array, geometry)
    (tmp_path / "names.json").write_text(json.dumps({"labels": LABELS}))
    store = tmp_path / "store"
    code = main(["-q", "prepare", str(images), "--labels", str(labels), "--out", str(store)])
    out, err = capsys.readouterr()
    assert code == 1
    _check_one_line_each(out, images, bad)
    for case, (_, _, phrase) in bad_labels(labels).items():
        if case == "values":  # any value 0..255 is a class without dataset.json; see finetune below
            continue
        lines = _lines_naming(out, labels / f"label_{case}.nii.gz")
        assert len(lines) == 1 and ("FAILED " + str(labels)) in lines[0], (case, lines)
        assert phrase.split(" vs")[0] in lines[0], (case, lines)
    stored = sorted(p.stem for p in (store / "cases").glob("*.json"))
    assert "good" in stored and "label_values" in stored and len(stored) == 2
    assert not _temporaries(store) and "Traceback" not in err


def test_predict_skips_every_bad_image_and_writes_the_good_ones(tiny_checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    bad = bad_images(images)
    _write_good(images, None, ["good"])
    out_dir = tmp_path / "preds"
    code = main(["-q", "predict", "-m", str(tiny_checkpoint), "-i", str(images), "-o", str(out_dir),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    _check_one_line_each(out, images, bad)
    assert sorted(p.name for p in out_dir.iterdir()) == ["good.nii.gz"]  # nothing for a bad case, no temporary
    assert "Traceback" not in err


def test_show_skips_every_bad_image_and_draws_the_good_ones(tmp_path, capsys):
    images = tmp_path / "images"
    bad = bad_images(images)
    _write_good(images, None, ["good", "other"])
    png = tmp_path / "fusion.png"
    assert main(["-q", "show", "fusion", "-i", str(images), "--out", str(png), "--samples", "1",
                 *[a for o in TINY_MODEL[:4] for a in ("--set", o)]]) == 0
    err = capsys.readouterr().err
    _check_one_line_each(err, images, bad)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_finetune_leaves_out_bad_cases_of_its_dataset_and_trains_on_the_rest(tmp_path, capsys):
    dataset = tmp_path / "Task01_Bad"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    _write_good(dataset / "imagesTr", dataset / "labelsTr", ["good0", "good1"])
    cases = ["good0", "good1"]
    (dataset / "imagesTr" / "corrupt.nii.gz").write_bytes(b"\x00garbage" * 50)
    write_image(dataset / "labelsTr" / "corrupt.nii.gz", _label(), GEOMETRY)
    labels = bad_labels(dataset)
    for case in ("size", "values"):
        write_image(dataset / "imagesTr" / f"{case}.nii.gz", _ct(3), GEOMETRY)
        write_image(dataset / "labelsTr" / f"{case}.nii.gz", labels[case][0], labels[case][1])
    entries = cases + ["corrupt", "size", "values"]
    (dataset / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": [
        {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in entries]}))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["good0"], "val": ["good1"]}))
    run = tmp_path / "run"
    args = ["-q", "finetune", "--data", str(dataset), "--pretrained", "none", "--out", str(run), "--split",
            str(split), "--max-steps", "1", *[a for o in TINY_MODEL for a in ("--set", o)],
            "--set", "run.val_every=1", "--set", "run.val_samples=1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    expected = {dataset / "imagesTr" / "corrupt.nii.gz": "cannot read image",
                dataset / "labelsTr" / "size.nii.gz": labels["size"][2],
                dataset / "labelsTr" / "values.nii.gz": labels["values"][2]}
    for path, phrase in expected.items():
        lines = _lines_naming(err, path)
        assert len(lines) == 1 and phrase in lines[0], (path, lines)
    assert (run / "checkpoints" / "latest.pt").is_file() and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# evaluate refuses a run with a bad label map, naming it; nothing is written


EVALUATE_CASES = ["corrupt", "truncated", "empty", "nan", "loop", "dangling", "size", "spacing", "origin",
                  "direction", "fractional", "negative"]


@pytest.mark.parametrize("kind", EVALUATE_CASES)
def test_evaluate_refuses_a_bad_label_map_in_one_line_and_writes_nothing(tmp_path, capsys, kind):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    for folder in (pred, gt):
        folder.mkdir()
        for case in ("case0", "case1"):
            write_image(folder / f"{case}.nii.gz", _label(), GEOMETRY)
    target = pred / "case1.nii.gz"
    target.unlink()
    phrase = {"corrupt": "cannot read image", "truncated": "truncated", "empty": "file is empty",
              "nan": "NaN or infinite", "loop": "symbolic link loop", "dangling": "symbolic link to a missing",
              "size": "shape",
              "spacing": "spacing", "origin": "origin", "direction": "direction",
              "fractional": "non-integer values", "negative": "negative values"}[kind]
    if kind in bad_labels(tmp_path / "unused"):
        array, geometry, _ = bad_labels(tmp_path / "unused")[kind]
        write_image(target, array, geometry)
    elif kind == "negative":
        write_image(target, _label().astype(np.int16) - 1, GEOMETRY)
    elif kind == "loop":
        target.symlink_to(target.name)
    elif kind == "dangling":
        target.symlink_to("gone.nii.gz")
    else:
        bad_images(tmp_path / "pool")
        os.replace(tmp_path / "pool" / f"{kind}.nii.gz", target)
    out_csv = tmp_path / "results" / "metrics.csv"
    assert main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out_csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("volumefusion evaluate: error: ") and phrase in err, err
    assert "case1" in err or str(target) in err
    assert not out_csv.exists() and not _temporaries(tmp_path / "results")


# --------------------------------------------------------------------------------------------------
# bad checkpoints: every command that reads one refuses it in one line, before any work


def _reading_command(command: str, checkpoint: Path, image: Path, tmp_path: Path) -> list[str]:
    """The command line of ``command`` (predict, finetune, convert or export) reading ``checkpoint``."""
    if command == "export":
        return ["export", "nnunet", "--checkpoint", str(checkpoint), "--plans",
                str(write_ct_plans(tmp_path / "p.json")), "--out", str(tmp_path / "nnunet")]
    return {"predict": ["predict", "-m", str(checkpoint), "-i", str(image), "-o", str(tmp_path / "out")],
            "finetune": ["finetune", "--data", str(tmp_path / "nowhere"), "--pretrained", str(checkpoint),
                         "--out", str(tmp_path / "run")],
            "convert": ["convert", str(checkpoint), "--out", str(tmp_path / "ours.pt")]}[command]


@pytest.mark.parametrize("command", ["predict", "finetune", "convert"])
def test_a_bad_checkpoint_is_refused_in_one_line_saying_what_it_is(tmp_path, capsys, command):
    image = tmp_path / "ct.nii.gz"
    write_image(image, _ct(0), GEOMETRY)
    for name, (path, phrase) in write_bad_checkpoints(tmp_path / "checkpoints").items():
        args = _reading_command(command, path, image, tmp_path)
        assert main(["-q", *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"volumefusion {command}: error: {path}: ") and phrase in err, (name, err)
        assert "\n" not in err and "weights_only" not in err, (name, err)
    assert not (tmp_path / "ours.pt").exists() and not any((tmp_path / "out").glob("*"))


def bad_checkpoint_contents(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are checkpoints of a readable format holding the wrong things, and broken
    safetensors files: ``{name: (path, phrase the error must contain)}``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.load(overrides=TINY_MODEL[:4])
    state = {k: v.contiguous() for k, v in build_model(cfg.model, 3).state_dict().items()}
    meta = {"config": json.dumps(cfg.to_dict()), "num_classes": "3"}
    files = {}

    def add(name: str, phrase: str) -> Path:
        files[name] = (folder / name, phrase)
        return folder / name

    torch.save(torch.zeros(3), add("tensor.pt", "holds a Tensor, not a checkpoint"))
    save_checkpoint(add("hello.pt", "its config is a str ('hello'), not a mapping"),
                    {"model": state, "config": "hello", "task": {"num_classes": 3}})
    save_checkpoint(add("five.pt", "task.num_classes is 'five'"),
                    {"model": state, "config": cfg.to_dict(), "task": {"num_classes": "five"}})
    add("text.safetensors", "a text file").write_text("these are not the weights\n")
    add("empty.safetensors", "an empty file (0 bytes)").write_bytes(b"")
    whole = add("truncated.safetensors", "truncated or damaged")
    save_file(state, str(whole), metadata=meta)
    whole.write_bytes(whole.read_bytes()[:-100])
    lying = add("lying.safetensors", "its header claims 1000000 bytes")
    lying.write_bytes((1000000).to_bytes(8, "little") + b'{"w": {}}')
    save_file(state, str(add("config.safetensors", "its metadata config is not JSON")),
              metadata={**meta, "config": "{model: pctnet"})
    save_file(state, str(add("classes.safetensors", "task.num_classes is 'five'")),
              metadata={**meta, "num_classes": "five"})
    return files


@pytest.mark.parametrize("command", ["predict", "finetune", "convert", "export"])
def test_a_checkpoint_with_the_wrong_contents_is_refused_in_one_line_naming_it(tmp_path, capsys, command):
    image = tmp_path / "ct.nii.gz"
    write_image(image, _ct(0), GEOMETRY)
    for name, (path, phrase) in bad_checkpoint_contents(tmp_path / "checkpoints").items():
        args = _reading_command(command, path, image, tmp_path)
        assert main(["-q", *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"volumefusion {args[0]}: error: {path}: ") and phrase in err, (name, err)
        assert "\n" not in err, (name, err)
    assert not (tmp_path / "ours.pt").exists() and not (tmp_path / "nnunet").exists()


def test_load_model_names_the_file_and_the_problem_of_every_bad_checkpoint(tmp_path):
    import volumefusion as vf
    from volumefusion import VolumeFusionError

    files = write_bad_checkpoints(tmp_path / "files")
    del files["safetensors"]  # tensors without a config: tests/test_api.py
    catalogue = {**bad_checkpoint_contents(tmp_path), **files}
    cfg = config.load(overrides=TINY_MODEL[:4])
    save_checkpoint(tmp_path / "no_task.pt", {"model": build_model(cfg.model, 3).state_dict(), "config": cfg.to_dict()})
    catalogue["no_task"] = (tmp_path / "no_task.pt", "no task.num_classes")
    for name, (path, phrase) in catalogue.items():
        with pytest.raises(VolumeFusionError) as error:
            vf.load_model(path)
        assert str(error.value).startswith(f"{path}: ") and phrase in str(error.value), (name, str(error.value))


def test_builtin_weights_are_taken_wherever_a_checkpoint_is(tmp_path, capsys):
    import volumefusion as vf

    assert vf.load_model("builtin:demo").num_classes == 5
    out = tmp_path / "nnunet"
    plans = write_ct_plans(tmp_path / "p.json")
    assert main(["-q", "export", "nnunet", "--checkpoint", "builtin:demo", "--plans", str(plans),
                 "--out", str(out)]) == 0
    assert (out / "nnUNetPlans_volumefusion_3d_fullres_pctnet.pth").is_file()
    assert main(["-q", "convert", "builtin:demo", "--out", str(tmp_path / "x.pt")]) == 2
    assert "builtin:demo: a volumefusion checkpoint, which needs no conversion" in capsys.readouterr().err
def test_a_checkpoint_with_nonfinite_weights_is_refused_by_every_reader(tmp_path, capsys, tiny_checkpoint):
    """A diverged run's weights: predicting, fine-tuning or loading from them is refused in one line."""
    from volumefusion import api
    from volumefusion.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name][0] = float("nan")
    diverged = tmp_path / "diverged.pt"
    save_checkpoint(diverged, ckpt)
    image = tmp_path / "ct.nii.gz"
    write_image(image, _ct(0), GEOMETRY)
    phrase = f"{diverged}: 1 of {len(ckpt['model'])} weight tensors hold NaN or infinite values ({name})"
    for command in (["predict", "-m", str(diverged), "-i", str(image), "-o", str(tmp_path / "out")],
                    ["finetune", "--data", str(tmp_path / "nowhere"), "--pretrained", str(diverged),
                     "--out", str(tmp_path / "run")]):
        assert main(["-q", *command]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and phrase in err, err
    with pytest.raises(VolumeFusionError, match=re.escape(phrase)):
        api.load_model(diverged)


# --------------------------------------------------------------------------------------------------
# bad outputs: refused before the work, or failed without leaving half a file


@contextlib.contextmanager
def _disk_full(limit: int = 64):
    """Files written meanwhile cannot grow beyond ``limit`` bytes (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so writes fail with EFBIG as on a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _command(name: str, tmp_path: Path, out: Path, checkpoint: Path) -> list[str]:
    """``name``'s arguments with ``out`` as its output, on good inputs."""
    images = tmp_path / "images"
    if not images.exists():
        images.mkdir()
        _write_good(images, None, ["good"])
        (tmp_path / "gt").mkdir()
        write_image(tmp_path / "gt" / "good.nii.gz", _label(), GEOMETRY)
    return {
        "prepare": ["prepare", str(images), "--out", str(out)],
        "predict": ["predict", "-m", str(checkpoint), "-i", str(images), "-o", str(out), "--device", "cpu"],
        "evaluate": ["evaluate", "--pred", str(tmp_path / "gt"), "--gt", str(tmp_path / "gt"), "--out", str(out)],
        "convert": ["convert", str(checkpoint), "--out", str(out)],
        "show": ["show", "fusion", "-i", str(images), "--out", str(out), "--samples", "1",
                 *[a for o in TINY_MODEL[:4] for a in ("--set", o)]],
        "finetune": ["finetune", "--data", str(tmp_path / "nowhere"), "--pretrained", "none", "--out", str(out)],
    }[name]


FOLDER_OUTPUTS = {"prepare", "predict", "finetune"}


@pytest.mark.parametrize("problem", ["unwritable", "taken"])
@pytest.mark.parametrize("command", ["prepare", "predict", "evaluate", "convert", "show", "finetune"])
def test_an_output_that_cannot_be_written_is_refused_in_one_line_before_the_work(
        tmp_path, capsys, command, problem, unwritable_folder, tiny_checkpoint):
    name = "out" if command in FOLDER_OUTPUTS else {"evaluate": "m.csv", "convert": "o.pt", "show": "f.png"}[command]
    if problem == "unwritable":
        out = unwritable_folder / "volumefusion_test" / name
        expected = "is not writable"
    else:  # the output's name is taken by the wrong kind of thing
        out = tmp_path / name
        if command in FOLDER_OUTPUTS:
            out.write_text("an earlier result")
            expected = "is a file;"
        else:
            out.mkdir()
            expected = "is a folder;"
    before = sorted(tmp_path.rglob("*"))
    assert main(["-q", *_command(command, tmp_path, out, tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"volumefusion {command}: error: ") and expected in err, err
    assert str(out) in err or str(out.parent) in err
    assert not _temporaries(tmp_path) and len(sorted(tmp_path.rglob("*"))) <= len(before) + 4  # inputs only


@pytest.mark.parametrize("command", ["prepare", "predict", "evaluate", "convert", "show"])
def test_a_full_disk_fails_in_one_line_and_leaves_no_half_written_file(tmp_path, capsys, command,
                                                                      tiny_checkpoint):
    name = "out" if command in FOLDER_OUTPUTS else {"evaluate": "m.csv", "convert": "o.pt", "show": "f.png"}[command]
    out = tmp_path / "results" / name
    args = _command(command, tmp_path, out, tiny_checkpoint)
    if command == "convert":  # convert needs a MIS-FM checkpoint; a small one in the reference layout
        if not (CONFORMANCE / "pctnet_small_misfm.pt").is_file():
            pytest.skip("conformance data not present")
        args[1] = str(CONFORMANCE / "pctnet_small_misfm.pt")
    with _disk_full():
        code = main(["-q", *args])
    out_text, err = capsys.readouterr()
    assert code == 1
    # Python's writes report the error; ITK's are caught by checking the written file
    lines = [line for line in (out_text + err).splitlines() if "File too large" in line or "disk full" in line]
    assert lines and all(str(tmp_path / "results") in line for line in lines), out_text + err
    assert "Traceback" not in err and not _temporaries(tmp_path / "results")
    written = [p for p in (tmp_path / "results").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert all(p.stat().st_size <= 64 for p in written)  # nothing cut off at the limit survives as output
    if command not in FOLDER_OUTPUTS:
        assert not out.exists()


# --------------------------------------------------------------------------------------------------
# refused runs: one line, before any work, and no output folder left behind


@pytest.mark.parametrize("argv", [["demo", "--workers", "-5"], ["demo", "--workers", "0"],
                                  ["prepare", "in", "--out", "store", "--workers", "0"]])
def test_workers_below_one_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"argument --workers/-j: {argv[-1]}: must be 1 or more" in err.replace(
        "argument --workers:", "argument --workers/-j:"), err


@pytest.mark.parametrize("command", ["prepare", "predict", "pretrain", "finetune"])
def test_a_refused_run_leaves_no_output_folder(tmp_path, capsys, command):
    out = tmp_path / "results" / "out"
    (tmp_path / "empty").mkdir()
    image = tmp_path / "ct.nii.gz"
    write_image(image, _ct(0), GEOMETRY)
    (tmp_path / "bad.pt").write_bytes(b"")
    args = {"prepare": ["prepare", str(tmp_path / "empty"), "--out", str(out)],
            "predict": ["predict", "-m", str(tmp_path / "bad.pt"), "-i", str(image), "-o", str(out)],
            "pretrain": ["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(out)],
            "finetune": ["finetune", "--data", str(tmp_path / "nowhere"), "--pretrained", "none", "--out", str(out)],
            }[command]
    if command == "prepare":  # a batch command: the input is skipped (and named), the run fails
        assert main(["-q", *args]) == 1
        assert f"FAILED {tmp_path / 'empty'}: folder holds no" in capsys.readouterr().out
    else:
        assert main(["-q", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"volumefusion {command}: error: "), err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_crop_that_leaves_one_voxel_at_the_coarsest_level_is_refused_naming_the_smallest(
        tmp_path, capsys, phantom_store, command):
    from volumefusion.train.runs import check_model_settings

    out = tmp_path / "run"
    settings = [a for o in [*TINY_MODEL, "data.crop_size=[8,16,16]"] for a in ("--set", o)]
    args = {"pretrain": ["pretrain", "--data", str(phantom_store)],
            "finetune": ["finetune", "--data", str(tmp_path / "nowhere"), "--pretrained", "none"]}[command]
    assert main(["-q", *args, "--out", str(out), *settings, "--batch-size", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.crop_size: [8, 16, 16]" in err and "the smallest crop it takes" in err, err
    assert "e.g. [16, 16, 16], or use run.batch_size 2 or more" in err, err
    assert not out.exists()
    check_model_settings(config.load(overrides=[*TINY_MODEL, "data.crop_size=[8,16,16]", "run.batch_size=2"]))


# --------------------------------------------------------------------------------------------------
# the Python API: one path where a list is expected, impossible arrays and spacings


def test_the_api_takes_one_path_or_override_as_a_list_of_one_not_as_letters(tmp_path, tiny_checkpoint):
    import volumefusion as vf

    images = tmp_path / "images"
    images.mkdir()
    _write_good(images, None, ["good"])
    summary = vf.prepare_collection(str(images), tmp_path / "store")
    assert summary.prepared == ["good"] and not summary.failed
    predicted = vf.predict_files(tiny_checkpoint, images / "good.nii.gz", tmp_path / "preds", device="cpu")
    assert predicted.written == ["good"]
    assert vf.load_config(overrides="run.max_steps=5").run.max_steps == 5
    assert vf.load_config("pretrain_paper", "run.max_steps=5").run.max_steps == 5
    with pytest.raises(VolumeFusionError, match=r"run\.max_stepz"):  # the override reached the config whole
        vf.pretrain(tmp_path / "store", tmp_path / "run", overrides="run.max_stepz=5")
    with pytest.raises(VolumeFusionError, match=r"run\.max_stepz"):
        vf.finetune(tmp_path / "nowhere", tmp_path / "run", overrides="run.max_stepz=5")
    with pytest.raises(VolumeFusionError, match="inputs: a int; expected a path or string"):
        vf.prepare_collection(7, tmp_path / "store")


@pytest.mark.parametrize("resample", [False, True])
def test_predict_array_refuses_nonfinite_voxels_and_impossible_spacings_naming_the_argument(tiny_checkpoint,
                                                                                             resample):
    import volumefusion as vf
    from volumefusion.preprocess import PrepareSettings

    predictor = vf.load_predictor(tiny_checkpoint, device="cpu")
    if resample:
        predictor.settings = PrepareSettings(spacing_zyx=(2.0, 2.0, 2.0))
    image = _ct(0)
    spacing = GEOMETRY.spacing_zyx
    bad = {
        "image: 16384 of 16384 voxels are NaN or infinite": (np.full(SHAPE, np.nan, np.float32), spacing),
        "image: 1 of 16384 voxels are NaN or infinite": (np.where(np.arange(image.size).reshape(SHAPE) == 5,
                                                                   np.inf, image), spacing),
        "spacing_zyx (0.0, 1.5, 1.5): voxel sizes must be positive": (image, (0, 1.5, 1.5)),
        "spacing_zyx (-2.0, 1.5, 1.5): voxel sizes must be positive": (image, (-2, 1.5, 1.5)),
        "spacing_zyx (nan, 1.5, 1.5): voxel sizes must be positive": (image, (float("nan"), 1.5, 1.5)),
        "spacing_zyx: 2.5; expected 3 numbers (mm, z y x)": (image, 2.5),
        "spacing_zyx: (2.0, 1.5); expected 3 numbers": (image, (2.0, 1.5)),
        "spacing_zyx: '2.5'; expected 3 numbers": (image, "2.5"),
    }
    for phrase, (array, spacing_zyx) in bad.items():
        with pytest.raises(VolumeFusionError, match=re.escape(phrase)):
            vf.predict_array(predictor, array, spacing_zyx)
    with pytest.raises(VolumeFusionError, match=re.escape("origin: (0, 0); expected 3 numbers")):
        vf.predict_array(predictor, image, spacing, origin=(0, 0))
    with pytest.raises(VolumeFusionError, match="direction .*: must be an invertible 3x3 matrix"):
        vf.predict_array(predictor, image, spacing, direction=(0.0,) * 9)
    with pytest.raises(VolumeFusionError, match=re.escape("spacing_zyx (0.0, 1.0, 1.0): voxel sizes must be")):
        vf.evaluate_arrays(_label(), _label(), [1, 2], spacing_zyx=(0, 1, 1))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained segmentation checkpoint (3 classes, native spacing) for predict."""
    cfg = config.load(overrides=TINY_MODEL[:4])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    task = {"kind": "segmentation", "num_classes": 3, "label_names": LABELS, "preprocessing": {}}
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "task": task, "step": 0})
    return path


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "abc"])
def test_prepare_refuses_a_voxel_size_that_is_not_a_positive_finite_number(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stopped:
        main(["prepare", str(tmp_path), "--out", str(tmp_path / "store"), "--spacing", value, "1", "1"])
    assert stopped.value.code == 2 and "argument --spacing" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
    with pytest.raises(VolumeFusionError, match="positive, finite"):
        PrepareSettings(spacing_zyx=(float(value) if value != "abc" else float("nan"), 1.0, 1.0))


def test_predict_takes_the_overlaps_a_config_takes(tmp_path, capsys):
    from volumefusion.config import MAX_OVERLAP

    assert main(["predict", "-m", "builtin:demo", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--overlap",
                 "0.96"]) == 2
    assert f"must be in [0, {MAX_OVERLAP}], as finetune.overlap" in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match="finetune.overlap"):
        config.load(overrides=["finetune.overlap=0.96"])


def test_a_long_valid_file_name_is_prepared_and_predicted(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    name = "p" * 233 + ".nii.gz"  # 240 bytes: valid, but a temporary name with a prefix and suffix is not
    write_image(images / name, _ct(0), GEOMETRY)
    assert main(["-q", "prepare", str(images), "--out", str(tmp_path / "store")]) == 0
    assert main(["-q", "predict", "-m", str(tiny_checkpoint), "-i", str(images), "-o", str(tmp_path / "preds"),
                 "--device", "cpu"]) == 0
    assert [p.name for p in (tmp_path / "preds").iterdir()] == [name]


def test_duplicate_label_names_in_a_dataset_are_refused(tmp_path):
    from volumefusion.data.datasets import read_dataset_description

    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "kidney", "2": "kidney"}}))
    with pytest.raises(VolumeFusionError, match="labels 1 and 2 are both named 'kidney'"):
        read_dataset_description(path)


def test_show_fusion_writes_only_a_png(tmp_path, capsys):
    assert main(["show", "fusion", "--out", str(tmp_path / "f.txt")]) == 2
    assert "the picture is a PNG" in capsys.readouterr().err and not (tmp_path / "f.txt").exists()


def test_resume_names_an_intact_checkpoint_and_refuses_a_shorter_run(phantom_store, tmp_path):
    from volumefusion.train.runs import pretrain

    run = [*TINY_MODEL, "run.val_every=100", "run.checkpoint_every=1", "run.keep_last=5"]
    pretrain(config.load(overrides=[*run, "run.max_steps=3"]), phantom_store, tmp_path)
    with pytest.raises(VolumeFusionError, match="at step 3, beyond run.max_steps 2"):
        pretrain(config.load(overrides=[*run, "run.max_steps=2"]), phantom_store, tmp_path, resume=True)
    latest = tmp_path / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:500])
    with pytest.raises(VolumeFusionError, match=r"newest intact checkpoint of this run is .*step_00000003.pt"):
        pretrain(config.load(overrides=[*run, "run.max_steps=4"]), phantom_store, tmp_path, resume=True)


@pytest.mark.parametrize("command", ["prepare", "predict"])
def test_a_full_disk_is_named_as_such(small_disk, tmp_path, capsys, command, tiny_checkpoint):
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(2):  # noise does not compress: each case is larger than the disk
        write_image(images / f"c{i}.nii.gz", rng.integers(-1000, 1000, (40, 96, 96)).astype(np.int16),
                    Geometry((40, 96, 96), (2.0, 1.5, 1.5), (0.0, 0.0, 0.0)))
    if command == "predict":
        (small_disk / "filler").write_bytes(bytes(392 * 1024))
        args = ["predict", "-m", str(tiny_checkpoint), "-i", str(images), "-o", str(small_disk / "out"),
                "--device", "cpu"]
    else:
        args = ["prepare", str(images), "--out", str(small_disk / "store")]
    assert main(["-q", *args]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAILED" in line or "failed:" in line]
    assert failed and "No space left on device" in failed[0], out
    assert str(small_disk) in failed[0] and "unexpected" not in out and "unpack" not in out, out
