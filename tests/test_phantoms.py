"""Procedural CT phantoms: determinism, plausible HU per tissue, labels aligned with the image,
anatomy that changes along z, and files written with their geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from volumefusion import VolumeFusionError
from volumefusion.data.phantoms import LABEL_NAMES, Phantom, make_phantom, write_msd_dataset, write_phantoms
from volumefusion.io import read_image

SEEDS = (0, 1, 2, 3)
NAME_TO_LABEL = {v: k for k, v in LABEL_NAMES.items()}


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [make_phantom(seed) for seed in SEEDS]


def _mean_hu(p: Phantom, name: str) -> float:
    return float(p.image[p.label == NAME_TO_LABEL[name]].mean())


def test_default_phantom_has_documented_shape_dtypes_and_spacing(phantoms):
    p = phantoms[0]
    assert p.image.shape == p.label.shape == (64, 160, 160)
    assert p.image.dtype == np.int16 and p.label.dtype == np.uint8
    assert p.spacing_zyx == (2.5, 1.5, 1.5)
    assert set(np.unique(p.label)) <= set(LABEL_NAMES)


def test_same_seed_gives_identical_phantom():
    a, b = make_phantom(7, shape=(24, 48, 48)), make_phantom(7, shape=(24, 48, 48))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)


def test_different_seeds_give_different_anatomy(phantoms):
    a, b = phantoms[0], phantoms[1]
    assert (a.label != b.label).mean() > 0.01
    assert np.abs(a.image.astype(np.int32) - b.image).mean() > 20


def test_every_organ_is_present_in_default_phantoms(phantoms):
    for p in phantoms:
        counts = np.bincount(p.label.ravel(), minlength=len(LABEL_NAMES))
        missing = [LABEL_NAMES[k] for k in LABEL_NAMES if counts[k] < 200]
        assert not missing, missing


def test_tissue_hu_is_plausible(phantoms):
    for p in phantoms:
        assert _mean_hu(p, "lung_right") < -700 and _mean_hu(p, "lung_left") < -700
        assert 30 <= _mean_hu(p, "liver") <= 90
        assert 30 <= _mean_hu(p, "spleen") <= 90
        assert _mean_hu(p, "spine") > 300
        assert _mean_hu(p, "aorta") > 120  # contrast-enhanced blood
        assert _mean_hu(p, "kidney_left") > 80 and _mean_hu(p, "kidney_right") > 80
        assert 40 <= _mean_hu(p, "heart") <= 250
        corner = p.image[:, :8, :8]  # outside the body: air
        assert abs(corner.mean() + 1000) < 15


def test_liver_and_spleen_are_not_separable_by_hu(phantoms):
    # the segmentation task must use shape and position: these two organs share a HU range
    for p in phantoms:
        assert abs(_mean_hu(p, "liver") - _mean_hu(p, "spleen")) < 25


def test_label_map_is_aligned_with_the_image(phantoms):
    for p in phantoms:
        lung = np.isin(p.label, [NAME_TO_LABEL["lung_right"], NAME_TO_LABEL["lung_left"]])
        ring = ndimage.binary_dilation(lung) & ~lung
        # inside the label: parenchyma; the voxels touching it from outside: chest wall, heart, liver...
        # (shifting the label by one voxel drops the second share to about 0.75)
        assert (p.image[lung] < -600).mean() > 0.9
        assert (p.image[ring] > -600).mean() > 0.97
        spine = p.label == NAME_TO_LABEL["spine"]
        assert (p.image[spine] > 150).mean() > 0.99


def _share_in_top_half(p: Phantom, *names: str) -> float:
    mask = np.isin(p.label, [NAME_TO_LABEL[n] for n in names])
    return mask[p.label.shape[0] // 2:].sum() / mask.sum()


def test_thorax_is_on_top_and_abdomen_at_the_bottom(phantoms):
    for p in phantoms:
        assert _share_in_top_half(p, "lung_right", "lung_left", "heart") > 0.7
        assert _share_in_top_half(p, "liver", "spleen", "kidney_right", "kidney_left") < 0.3


def test_spacing_is_kept_and_anatomy_fills_any_field_of_view():
    p = make_phantom(3, shape=(20, 64, 48), spacing_zyx=(5.0, 1.0, 1.25))
    assert p.image.shape == (20, 64, 48) and p.spacing_zyx == (5.0, 1.0, 1.25)
    assert set(np.unique(p.label)) >= {NAME_TO_LABEL["liver"], NAME_TO_LABEL["spine"], NAME_TO_LABEL["heart"]}


@pytest.mark.parametrize("shape, spacing", [((24, 2, 48), (2.5, 1.5, 1.5)), ((24, 48, 48), (0.0, 1.5, 1.5))])
def test_bad_shape_or_spacing_is_a_user_error(shape, spacing):
    with pytest.raises(VolumeFusionError, match="phantom"):
        make_phantom(0, shape=shape, spacing_zyx=spacing)


def test_write_phantoms_round_trips_arrays_and_geometry(tmp_path):
    shape, spacing = (16, 40, 32), (3.0, 1.25, 1.5)
    paths = write_phantoms(tmp_path / "raw", seeds=[5, 6], with_labels=True, shape=shape, spacing_zyx=spacing)
    assert [p.name for p in paths] == ["phantom_0005.nii.gz", "phantom_0006.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "raw" / "images").iterdir()) == [p.name for p in paths]
    expected = make_phantom(5, shape, spacing)
    image, geometry = read_image(paths[0])
    label, label_geometry = read_image(tmp_path / "raw" / "labels" / paths[0].name)
    assert np.array_equal(image, expected.image) and np.array_equal(label, expected.label)
    assert geometry == label_geometry
    assert geometry.shape_zyx == shape and np.allclose(geometry.spacing_zyx, spacing)
    # centred on the world origin
    centre = np.array(geometry.origin) + (np.array(shape[::-1]) - 1) * np.array(spacing[::-1]) / 2
    assert np.allclose(centre, 0, atol=1e-4)


def test_write_phantoms_without_labels_writes_only_images(tmp_path):
    paths = write_phantoms(tmp_path, seeds=[1], shape=(12, 32, 32), fmt="mha")
    assert paths == [tmp_path / "images" / "phantom_0001.mha"]
    assert not (tmp_path / "labels").exists()


def test_write_msd_dataset_layout(tmp_path):
    root = write_msd_dataset(tmp_path / "Task01_Phantom", seeds=[2, 3], name="Phantom", shape=(12, 32, 32))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {str(k): v for k, v in LABEL_NAMES.items()}
    assert meta["numTraining"] == 2
    for entry in meta["training"]:
        image, _ = read_image(root / entry["image"])
        label, _ = read_image(root / entry["label"])
        assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
        assert image.dtype == np.int16 and image.shape == label.shape == (12, 32, 32)
        assert set(np.unique(label)) <= set(LABEL_NAMES)


def test_varied_scans_differ_as_ct_scans_do_and_keep_labels_aligned():
    """Across seeds, varied phantoms cover the contrast phases, turned and tilted poses, sizes and
    fields of view, missing organs and lesions; each is still deterministic, and organ HU follow the phase."""
    shape, spacing = (24, 48, 48), (6.0, 7.0, 7.0)
    scans = [make_phantom(seed, shape, spacing, vary=True) for seed in range(24)]
    info = [p.scan for p in scans]
    assert {s["phase"] for s in info} >= {"native", "arterial", "portal", "delayed"}
    rotations = [s["rotation_deg"] for s in info]
    assert min(rotations) < -8 and max(rotations) > 8 and all(abs(r) <= 15 for r in rotations)
    assert max(abs(s["tilt_deg"]) for s in info) > 4
    assert max(s["size"] for s in info) - min(s["size"] for s in info) > 0.1
    assert max(s["shift_zyx"][0] for s in info) - min(s["shift_zyx"][0] for s in info) > 0.3
    assert any(s["missing"] for s in info) and any(s["lesions"] for s in info)
    assert len({round(s["noise_sd"]) for s in info}) > 10
    for p, s in zip(scans, info):
        present = set(np.unique(p.label))
        for organ in s["missing"]:
            assert NAME_TO_LABEL[organ] not in present, (organ, s)
    # blood is dark without contrast and bright with it
    aorta = {s["phase"]: _mean_hu(p, "aorta") for p, s in zip(scans, info) if (p.label == 4).sum() > 20}
    assert aorta["native"] < 80 < aorta["portal"] < aorta["arterial"]
    again = make_phantom(5, shape, spacing, vary=True)
    assert np.array_equal(again.image, scans[5].image) and np.array_equal(again.label, scans[5].label)


def test_unvaried_phantoms_keep_their_anatomy_and_scan():
    """vary=False is the upright, centred, portal-venous phantom: its scan record is empty and the
    varied one of the same seed differs."""
    fixed, varied = make_phantom(3, (16, 32, 32)), make_phantom(3, (16, 32, 32), vary=True)
    assert fixed.scan == {} and varied.scan
    assert not np.array_equal(fixed.image, varied.image)


def test_textured_phantoms_tell_organs_apart_by_texture_not_mean_hu():
    """texture=True: same labels and, away from the retextured organs, the same image; liver, spleen
    and kidneys share a mean HU (plain kidneys are far brighter) and differ in texture: the liver
    grainy, the spleen smooth."""
    for seed in (0, 1):
        plain, textured = make_phantom(seed), make_phantom(seed, texture=True)
        assert np.array_equal(plain.label, textured.label)
        organs = np.isin(plain.label, [NAME_TO_LABEL[n] for n in ("liver", "spleen", "kidney_right", "kidney_left")])
        far = ~ndimage.binary_dilation(organs, iterations=5)
        assert np.array_equal(plain.image[far], textured.image[far])

        def inside(p, name):  # away from edges, where blur mixes organs
            return p.image[ndimage.binary_erosion(p.label == NAME_TO_LABEL[name], iterations=2)]
        liver = inside(textured, "liver")
        for kidney in ("kidney_right", "kidney_left"):
            assert inside(plain, kidney).mean() - inside(plain, "liver").mean() > 50
            assert abs(inside(textured, kidney).mean() - liver.mean()) < 15
        assert abs(inside(textured, "spleen").mean() - liver.mean()) < 10
        assert liver.std() > 2 * inside(textured, "spleen").std()
        assert liver.std() > 1.5 * inside(plain, "liver").std()
    again = make_phantom(1, texture=True)
    assert np.array_equal(again.image, textured.image)
