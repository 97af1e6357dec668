"""Dice, HD95, ASSD and NSD: known geometry, MONAI agreement, empty-mask conventions."""

from __future__ import annotations

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


def test_both_empty_is_a_perfect_score():
    empty = np.zeros((6, 7, 8), dtype=bool)
    m = binary_metrics(empty, empty, SPACING)
    assert (m["dice"], m["hd95"], m["assd"], m["nsd"]) == (1.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_one_empty_mask_scores_zero_and_the_largest_distance_in_the_image(empty_side):
    shape = (6, 7, 8)
    full = _cube(shape, (1, 1, 1), 3)
    empty = np.zeros(shape, dtype=bool)
    pred, ref = (empty, full) if empty_side == "pred" else (full, empty)
    m = binary_metrics(pred, ref, SPACING)
    diagonal = np.linalg.norm((np.array(shape) - 1) * np.array(SPACING))
    assert (m["dice"], m["nsd"]) == (0.0, 0.0)
    assert m["hd95"] == pytest.approx(diagonal)
    assert m["assd"] == pytest.approx(diagonal)
    assert m["pred_voxels" if empty_side == "pred" else "ref_voxels"] == 0


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
