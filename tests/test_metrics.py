"""Dice, HD95, ASSD and NSD: known geometry, MONAI agreement, empty-mask conventions."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from volumefusion.metrics import binary_metrics, evaluate_case, summarise

SPACING = (2.5, 0.7, 0.9)  # (z, y, x) mm, deliberately anisotropic


def _cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def _half_space(shape, axis, first):
    """True where the coordinate along ``axis`` is >= ``first`` (spans the image on the other axes)."""
    mask = np.zeros(shape, dtype=bool)
    index = [slice(None)] * 3
    index[axis] = slice(first, None)
    mask[tuple(index)] = True
    return mask


def _blobs(rng, shape, threshold=0.5):
    return ndimage.gaussian_filter(rng.random(shape), 2.0) > threshold


def _label_map(rng, shape):
    """Labels 0..3 from quantiles of a smooth random field: every class present, irregular shapes."""
    field = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return np.digitize(field, np.quantile(field, [0.4, 0.6, 0.8])).astype(np.int16)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_dice_of_a_cube_shifted_by_k_voxels_is_analytic(axis, k):
    n = 10
    start = np.array([4, 4, 4])
    shifted = start.copy()
    shifted[axis] += k
    m = binary_metrics(_cube((20, 22, 24), start, n), _cube((20, 22, 24), shifted, n), SPACING)
    assert m["dice"] == pytest.approx((n - k) / n)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_hd95_of_a_boundary_shifted_by_k_voxels_is_k_times_the_spacing_of_that_axis(axis, k):
    # Half-spaces whose boundary planes are k voxels apart: every surface distance is a multiple
    # of the spacing along the axis, at most k of them, and whole planes sit at exactly k.
    shape = (24, 26, 28)
    m = binary_metrics(_half_space(shape, axis, 8), _half_space(shape, axis, 8 + k), SPACING)
    assert m["hd95"] == pytest.approx(k * SPACING[axis])
    assert 0 < m["assd"] < k * SPACING[axis]


def test_nsd_counts_surface_within_the_tolerance_in_mm():
    shape, k = (24, 26, 28), 2
    pred, ref = _half_space(shape, 0, 8), _half_space(shape, 0, 8 + k)
    just_below = binary_metrics(pred, ref, SPACING, nsd_tolerance_mm=k * SPACING[0] - 1e-6)
    at = binary_metrics(pred, ref, SPACING, nsd_tolerance_mm=k * SPACING[0])
    assert 0 < just_below["nsd"] < 1
    assert at["nsd"] == 1.0


def test_label_map_against_itself_is_perfect():
    rng = np.random.default_rng(1)
    labels = _label_map(rng, (18, 24, 20))
    out = evaluate_case(labels, labels, SPACING, {1: "a", 2: "b", 3: "c"})
    for name in ("a", "b", "c"):
        assert out[name]["ref_voxels"] > 0
        assert out[name]["dice"] == 1.0
        assert out[name]["hd95"] == 0.0
        assert out[name]["assd"] == 0.0
        assert out[name]["nsd"] == 1.0


def test_both_empty_is_a_perfect_score_or_undefined_by_choice():
    empty = np.zeros((6, 7, 8), dtype=bool)
    m = binary_metrics(empty, empty, SPACING)
    assert (m["dice"], m["hd95"], m["assd"], m["nsd"]) == (1.0, 0.0, 0.0, 1.0)
    m = binary_metrics(empty, empty, SPACING, both_empty="nan")  # nnU-Net's Dice, MONAI's ignore_empty
    assert all(np.isnan(m[k]) for k in ("dice", "hd95", "assd", "nsd"))


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_one_empty_mask_scores_zero_and_leaves_distances_undefined(empty_side):
    shape = (6, 7, 8)
    full = _cube(shape, (1, 1, 1), 3)
    empty = np.zeros(shape, dtype=bool)
    pred, ref = (empty, full) if empty_side == "pred" else (full, empty)
    m = binary_metrics(pred, ref, SPACING)
    assert (m["dice"], m["nsd"]) == (0.0, 0.0)
    assert np.isnan(m["hd95"]) and np.isnan(m["assd"])
    assert m["pred_voxels" if empty_side == "pred" else "ref_voxels"] == 0
    monai = _monai(pred, ref, SPACING, 1.0)  # MONAI: HD95 NaN, ASSD inf (undefined either way), NSD 0
    assert np.isnan(monai["hd95"]) and not np.isfinite(monai["assd"]) and monai["nsd"] == 0.0


def test_evaluate_case_reports_absent_classes_with_the_empty_conventions():
    pred = np.zeros((8, 9, 10), dtype=np.int16)
    ref = pred.copy()
    ref[2:5, 2:5, 2:5] = 1
    out = evaluate_case(pred, ref, SPACING, [1, 4])
    assert out["1"]["dice"] == 0.0 and out["1"]["ref_voxels"] == 27
    assert out["4"]["dice"] == 1.0 and out["4"]["hd95"] == 0.0


def _monai(pred, ref, spacing, tolerance):
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    def onehot(mask):
        t = torch.from_numpy(mask)[None, None].float()
        return torch.cat([1 - t, t], dim=1)

    p, r = onehot(pred), onehot(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": compute_dice(p, r, include_background=False).item(),
            "hd95": compute_hausdorff_distance(p, r, percentile=95, spacing=spacing).item(),
            "assd": compute_average_surface_distance(p, r, symmetric=True, spacing=spacing).item(),
            "nsd": compute_surface_dice(p, r, [tolerance], spacing=spacing).item(),
        }


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_monai_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = (16, 28, 24)
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    pred, ref = _blobs(rng, shape), _blobs(rng, shape)
    ours = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.5)
    theirs = _monai(pred, ref, spacing, 1.5)
    for metric, value in theirs.items():
        assert ours[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric


def test_multilabel_crops_give_the_same_metrics_as_whole_binary_masks():
    rng = np.random.default_rng(7)
    shape = (20, 30, 26)
    pred, ref = _label_map(rng, shape), _label_map(rng, shape)
    out = evaluate_case(pred, ref, SPACING, {1: "one", 2: "two", 3: "three"}, nsd_tolerance_mm=2.0)
    for value, name in {1: "one", 2: "two", 3: "three"}.items():
        theirs = _monai(pred == value, ref == value, SPACING, 2.0)
        for metric, expected in theirs.items():
            assert out[name][metric] == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, metric)


def test_summary_gives_mean_std_median_per_class_and_metric():
    rows = [{"label": "a", "dice": d, "hd95": h, "assd": 0.0, "nsd": 1.0}
            for d, h in [(0.5, 1.0), (0.7, 3.0), (0.9, 8.0)]]
    s = summarise(rows)
    assert s["a"]["dice"]["mean"] == pytest.approx(0.7)
    assert s["a"]["dice"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9]))
    assert s["a"]["hd95"]["median"] == 3.0
    assert s["a"]["nsd"]["n"] == 3


def test_summary_averages_defined_values_and_counts_the_undefined():
    nan = float("nan")
    rows = [{"label": "a", "dice": d, "hd95": h, "assd": h, "nsd": 0.0}
            for d, h in [(0.8, 2.0), (0.0, nan), (0.6, 4.0)]]
    rows.append({"label": "b", "dice": nan, "hd95": nan, "assd": nan, "nsd": nan})
    s = summarise(rows)
    assert s["a"]["hd95"] == {"mean": 3.0, "std": 1.0, "median": 3.0, "min": 2.0, "max": 4.0, "n": 2,
                              "undefined": 1}
    assert s["a"]["dice"]["mean"] == pytest.approx(1.4 / 3) and s["a"]["dice"]["undefined"] == 0
    assert s["b"]["dice"] == {"mean": None, "std": None, "median": None, "min": None, "max": None, "n": 0,
                              "undefined": 1}


# --------------------------------------------------------------------------------------------------
# volumefusion evaluate


def _write_labels(folder, case, array, spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    from volumefusion.io import Geometry, write_image

    write_image(folder / f"{case}.nii.gz", array.astype(np.uint8), Geometry(array.shape, spacing, origin))


def _evaluate(*args) -> int:
    from volumefusion.cli import main

    return main(["-q", "evaluate", *map(str, args)])


@pytest.fixture
def folders(tmp_path):
    """Three cases: one predicted perfectly, one with class 2 shifted, one with class 3 missed."""
    rng = np.random.default_rng(5)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for i in range(3):
        ref = _label_map(rng, (12, 20, 16))
        out = ref.copy()
        if i == 1:
            out[out == 2] = 0
            out[np.roll(ref == 2, 1, axis=0)] = 2
        if i == 2:
            out[out == 3] = 0
        _write_labels(gt, f"case{i}", ref)
        _write_labels(pred, f"case{i}", out)
    (tmp_path / "dataset.json").write_text('{"labels": {"0": "background", "1": "a", "2": "b", "3": "c"}}')
    return tmp_path


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_a_row_per_case_and_class_a_summary_and_box_plots(folders):
    out = folders / "results" / "metrics.csv"
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt", "--labels", folders / "dataset.json",
                     "--tolerance", "2", "--out", out) == 0
    rows = _read_csv(out)
    assert [(r["case"], r["label"]) for r in rows] == [(f"case{i}", n) for i in range(3) for n in "abc"]
    by = {(r["case"], r["label"]): r for r in rows}
    assert all(float(by["case0", n]["dice"]) == 1.0 and float(by["case0", n]["hd95"]) == 0.0 for n in "abc")
    assert float(by["case1", "b"]["dice"]) < 1.0 and float(by["case1", "b"]["hd95"]) > 0
    assert float(by["case2", "c"]["dice"]) == 0.0 and int(by["case2", "c"]["pred_voxels"]) == 0
    assert by["case2", "c"]["hd95"] == "nan" and by["case2", "c"]["assd"] == "nan"  # a miss has no distance

    summary = json.loads(out.with_suffix(".json").read_text())
    dice_a = [float(by[f"case{i}", "a"]["dice"]) for i in range(3)]
    assert summary["cases"] == 3 and summary["nsd_tolerance_mm"] == 2.0
    assert summary["per_class"]["a"]["dice"]["mean"] == pytest.approx(np.mean(dice_a))
    assert summary["per_class"]["c"]["hd95"]["median"] == pytest.approx(
        np.median([float(by[f"case{i}", "c"]["hd95"]) for i in range(2)]))
    assert summary["per_class"]["c"]["hd95"]["n"] == 2 and summary["per_class"]["c"]["hd95"]["undefined"] == 1
    assert summary["both_empty"] == "one"
    for metric in ("dice", "hd95", "assd", "nsd"):
        png = out.with_name(f"metrics_{metric}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_of_the_chest_ct_label_map_against_itself_is_perfect(tmp_path):
    from volumefusion.data.samples import chest_ct, chest_ct_label_names
    from volumefusion.io import read_image, write_image

    labels, geometry = read_image(chest_ct()[1])
    for folder in ("pred", "gt"):
        write_image(tmp_path / folder / "chest.nii.gz", labels, geometry)
    names = {k: v for k, v in chest_ct_label_names().items() if k}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {str(k): v for k, v in names.items()}}))
    assert _evaluate("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--labels",
                     tmp_path / "dataset.json", "--out", tmp_path / "m.csv") == 0
    rows = _read_csv(tmp_path / "m.csv")
    assert sorted(r["label"] for r in rows) == sorted(names.values())
    assert all(float(r["dice"]) == 1.0 and float(r["hd95"]) == 0.0 and int(r["ref_voxels"]) > 0 for r in rows)


def test_without_labels_every_class_found_is_scored_in_every_case(folders):
    out = folders / "m.csv"
    (folders / "gt" / "case0.nii.gz").unlink()
    (folders / "pred" / "case0.nii.gz").unlink()
    ref = np.zeros((6, 8, 8), dtype=np.uint8)
    ref[1:4, 2:5, 2:5] = 9  # class 9 exists only in this case
    _write_labels(folders / "gt", "extra", ref)
    _write_labels(folders / "pred", "extra", ref)
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt", "--out", out, "--workers", "2") == 0
    rows = _read_csv(out)
    assert sorted({r["label"] for r in rows}) == ["1", "2", "3", "9"]
    assert len(rows) == 3 * 4
    absent = next(r for r in rows if r["case"] == "case1" and r["label"] == "9")
    assert float(absent["dice"]) == 1.0 and int(absent["ref_voxels"]) == 0


def test_both_empty_nan_leaves_absent_classes_out_of_the_means(folders, capsys):
    ref = np.zeros((6, 8, 8), dtype=np.uint8)
    ref[1:4, 2:5, 2:5] = 9  # class 9 exists only in this case, predicted perfectly
    _write_labels(folders / "gt", "extra", ref)
    _write_labels(folders / "pred", "extra", ref)
    out = folders / "m.csv"
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt", "--out", out, "--both-empty", "nan") == 0
    absent = next(r for r in _read_csv(out) if r["case"] == "case1" and r["label"] == "9")
    assert absent["dice"] == "nan"
    nine = json.loads(out.with_suffix(".json").read_text())["per_class"]["9"]["dice"]
    assert (nine["mean"], nine["n"], nine["undefined"]) == (1.0, 1, 3)
    assert "(undefined: dice in 3, hd95 in 3, assd in 3, nsd in 3 of 4 cases)" in capsys.readouterr().out


def test_a_missing_prediction_is_an_error_naming_the_case(folders, capsys):
    (folders / "pred" / "case1.nii.gz").unlink()
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt") == 2
    assert "case1" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["spacing", "origin", "shape"])
def test_a_prediction_on_another_grid_is_an_error_naming_the_case(folders, capsys, change):
    ref = _label_map(np.random.default_rng(0), (12, 20, 16))
    if change == "spacing":
        _write_labels(folders / "pred", "case2", ref, spacing=(2.5, 0.8, 0.9))
    elif change == "origin":
        _write_labels(folders / "pred", "case2", ref, origin=(0.0, 5.0, 0.0))
    else:
        _write_labels(folders / "pred", "case2", ref[:, :, :-1])
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt") == 2
    err = capsys.readouterr().err
    assert "case case2" in err and change in err


def test_evaluate_matches_a_ground_truth_name_to_predicts_safe_output_name(folders):
    (folders / "gt" / "case0.nii.gz").rename(folders / "gt" / "case 0.nii.gz")  # predict writes case_0
    (folders / "pred" / "case0.nii.gz").rename(folders / "pred" / "case_0.nii.gz")
    out = folders / "metrics.csv"
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt", "--out", out) == 0
    assert {r["case"] for r in _read_csv(out)} == {"case_0", "case1", "case2"}


def test_an_unwritable_out_is_refused_before_any_case_is_evaluated(folders, capsys, unwritable_folder):
    (folders / "pred" / "case1.nii.gz").write_bytes(b"corrupt")  # evaluating first would fail on this
    out = unwritable_folder / "results" / "metrics.csv"
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"volumefusion evaluate: error: {out.parent}: --out folder is not writable")
    assert "\n" not in err
    assert _evaluate("--pred", folders / "pred", "--gt", folders / "gt", "--out", folders / "gt") == 2
    assert f"{folders / 'gt'}: is a folder; --out takes a file name" in capsys.readouterr().err
