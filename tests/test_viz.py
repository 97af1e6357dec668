"""PNG helpers and the ``show fusion`` command."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch

from volumefusion import viz
from volumefusion.cli import main


def read_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def no_temporary_files(folder) -> bool:
    return all(not p.name.startswith(".") for p in folder.iterdir())


def test_label_overlay_colours_classes_and_keeps_background_grey():
    image = np.linspace(0, 1, 12).reshape(3, 4)
    label = np.zeros((3, 4), dtype=np.uint8)
    label[1, 2], label[2, 3] = 1, 3
    rgb = viz.label_overlay(image, label, alpha=0.5, window=(0, 1))
    assert rgb.shape == (3, 4, 3)
    grey = rgb[label == 0]
    assert np.allclose(grey[:, 0], grey[:, 1]) and np.allclose(grey[:, 0], image[label == 0])
    assert np.allclose(rgb[1, 2], 0.5 * image[1, 2] + 0.5 * viz.LABEL_COLORS[1])
    assert np.allclose(rgb[2, 3], 0.5 * image[2, 3] + 0.5 * viz.LABEL_COLORS[3])


def test_each_class_has_one_fixed_colour():
    colours = viz.label_colors(np.array([[0, 1, 2, 17]]))
    assert np.array_equal(colours[0, :3], viz.LABEL_COLORS[:3])
    assert np.array_equal(colours[0, 3], viz.LABEL_COLORS[1])  # cycles past the table
    assert len({tuple(c) for c in viz.LABEL_COLORS}) == len(viz.LABEL_COLORS)


def test_middle_slices_take_the_centre_or_the_focus():
    volume = np.arange(11)[:, None, None] * np.ones((11, 3, 4))
    assert viz.middle_slices(volume)[0][0, 0] == 5
    assert [s[0, 0] for s in viz.middle_slices(volume, count=3)] == [2, 5, 8]
    assert viz.middle_slices(volume, axis=2)[0].shape == (11, 3)
    focus = np.zeros((11, 3, 4))
    focus[2:5] = 1
    assert viz.middle_slices(volume, focus=focus)[0][0, 0] == 3
    assert viz.middle_slices(torch.from_numpy(volume), axis=1)[0].shape == (11, 4)


def test_montage_writes_a_png_with_image_and_label_rows(tmp_path):
    images = [np.random.default_rng(i).normal(size=(20, 30)) for i in range(3)]
    labels = [torch.randint(0, 5, (20, 30)) for _ in range(2)]
    overlays = [viz.label_overlay(images[0], labels[0])]
    rows = [("image", images), ("label", labels, "label"), ("overlay", overlays, "image")]
    path = viz.save_montage(tmp_path / "m.png", rows,
                            col_titles=["a", "b", "c"], title="t", label_names=["0", "1", "2", "3", "4"])
    picture = read_png(path)
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # three columns, three short rows
    assert no_temporary_files(tmp_path)


def test_curves_and_box_plots_are_written(tmp_path):
    panels = {"loss": {"train": [(0, 1.0), (10, 0.5)], "validation": [(10, 0.7)]},
              "learning rate": {"lr": [(0, 1e-3), (10, 5e-4)]}, "empty": {}}
    read_png(viz.save_curves(tmp_path / "progress.png", panels))
    read_png(viz.save_boxplot(tmp_path / "dice.png", {"spleen": [0.9, float("nan"), 0.8], "liver": [0.95]},
                              "Dice", ylabel="Dice"))
    assert no_temporary_files(tmp_path)


def test_a_failed_picture_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        viz.save_montage(tmp_path / "bad.png", [("image", [np.zeros((2, 2, 2, 2))])])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["boxes", "grid"])
def test_show_fusion_draws_the_sample_ct(tmp_path, capsys, mode):
    pytest.importorskip("slicerio")
    out = tmp_path / "fusion.png"
    status = main(["show", "fusion", "--out", str(out), "--mode", mode, "--samples", "2",
                   "--set", "data.crop_size=[8,32,32]"])
    assert status == 0 and str(out) in capsys.readouterr().out
    picture = read_png(out)
    assert picture.shape[0] > picture.shape[1]  # four rows, two columns


def test_show_fusion_reads_a_prepared_store(tmp_path, phantom_store):
    out = tmp_path / "store.png"
    assert main(["show", "fusion", "--out", str(out), "-i", str(phantom_store), "--samples", "3",
                 "--set", "data.crop_size=[8,16,16]"]) == 0
    read_png(out)


def test_show_fusion_reads_a_folder_of_images(tmp_path):
    from volumefusion.data.phantoms import write_phantoms

    write_phantoms(tmp_path / "raw", seeds=[1, 2], shape=(16, 32, 32), with_labels=False)
    out = tmp_path / "folder.png"
    assert main(["show", "fusion", "--out", str(out), "-i", str(tmp_path / "raw" / "images"), "--samples", "2",
                 "--set", "data.crop_size=[8,16,16]"]) == 0
    read_png(out)


def test_show_crops_within_the_body_box_prepare_would_store(tmp_path):
    """The body box of ``show`` is prepare's: the largest component above the threshold, so a CT
    table apart from the body does not widen it."""
    from volumefusion.commands.show import _volumes
    from volumefusion.io import Geometry, write_image
    from volumefusion.preprocess import body_box

    image = np.full((8, 32, 32), -1000, np.int16)
    image[2:6, 8:20, 8:20] = 40  # the body
    image[:, 28:30, :] = 200  # the table, not connected to it
    write_image(tmp_path / "ct.nii.gz", image, Geometry(image.shape, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    [(_, _, box)] = _volumes([str(tmp_path / "ct.nii.gz")])
    assert box == body_box(image, -600) == ((2, 6), (8, 20), (8, 20))


def test_show_fusion_names_a_missing_input(tmp_path, capsys):
    missing = str(tmp_path / "none.nii.gz")
    assert main(["show", "fusion", "--out", str(tmp_path / "x.png"), "-i", missing]) == 2
    assert "none.nii.gz" in capsys.readouterr().err
