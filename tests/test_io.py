"""Image I/O: round trips with exact geometry, DICOM series, input discovery and every read error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from volumefusion import VolumeFusionError
from volumefusion.data.datasets import case_id_from_path, discover_inputs
from volumefusion.io import Geometry, read_image, write_image

# anisotropic, float32-exact values and a non-identity (flipped, permuted) direction: exact in every format
AXIS_ALIGNED = Geometry((6, 9, 11), (2.5, 0.75, 0.625), (-120.5, 33.25, -400.0),
                        (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0))
_C, _S = math.cos(0.3), math.sin(0.3)
ROTATED = Geometry((6, 9, 11), (2.5000001, 0.7031250123, 0.7031250123),
                   (-123.456789012, 45.6789, -1000.123456789), (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0))
FORMATS = ["nii.gz", "nii", "nrrd", "mha", "mhd"]


def _volume(dtype=np.int16, shape=(6, 9, 11)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 1000, shape).astype(dtype)


def _write_sitk(path, array, is_vector=False, spacing=None):
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def write_dicom_series(folder, array: np.ndarray, spacing_zyx, series_uid: str, origin=(0.0, 0.0, 0.0)):
    """One CT slice file per z with the tags a series reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        slice_ = image[:, :, z]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{z + 1}",
            "0008|0060": "CT", "0010|0010": "Phantom^Test", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid, "0020|0013": str(z + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0018|0050": f"{spacing_zyx[0]:.6f}", "0028|0030": f"{spacing_zyx[1]:.6f}\\{spacing_zyx[2]:.6f}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_round_trip_keeps_values_dtype_and_geometry_exactly(tmp_path, fmt, dtype):
    array = _volume(dtype)
    path = tmp_path / f"vol.{fmt}"
    write_image(path, array, AXIS_ALIGNED)
    back, geometry = read_image(path)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    assert geometry == AXIS_ALIGNED


@pytest.mark.parametrize("fmt, tolerance", [("mha", 0.0), ("mhd", 0.0), ("nrrd", 1e-12), ("nii.gz", 1e-5)])
def test_rotated_geometry_round_trip_to_format_precision(tmp_path, fmt, tolerance):
    path = tmp_path / f"vol.{fmt}"
    write_image(path, _volume(), ROTATED)
    _, geometry = read_image(path)
    for field in ("spacing_zyx", "origin", "direction"):
        np.testing.assert_allclose(getattr(geometry, field), getattr(ROTATED, field), rtol=tolerance, atol=0)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    write_image(tmp_path / "a.nii.gz", _volume(), AXIS_ALIGNED)
    write_image(tmp_path / "b.mhd", _volume(), AXIS_ALIGNED)
    assert (tmp_path / "a.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # the temp name kept .gz: compressed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.mhd", "b.zraw"]


def test_write_rejects_unknown_extension_and_mismatched_shape(tmp_path):
    with pytest.raises(VolumeFusionError, match="unknown image extension"):
        write_image(tmp_path / "a.png", _volume(), AXIS_ALIGNED)
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "a.nii.gz", _volume(shape=(2, 3, 4)), AXIS_ALIGNED)
    assert list(tmp_path.iterdir()) == []


def test_geometry_dict_round_trip():
    assert Geometry.from_dict(ROTATED.to_dict()) == ROTATED


def test_dicom_series_folder_reads_as_volume(tmp_path):
    array = _volume(shape=(5, 16, 12))
    write_dicom_series(tmp_path / "patient1", array, (2.5, 0.8, 0.8), "1.2.826.0.1.3680043.2.1125.10")
    back, geometry = read_image(tmp_path / "patient1")
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(geometry.spacing_zyx, (2.5, 0.8, 0.8), rtol=1e-5)


def test_folder_with_two_series_lists_them_and_one_can_be_picked(tmp_path):
    first, second = "1.2.826.0.1.3680043.2.1125.21", "1.2.826.0.1.3680043.2.1125.22"
    write_dicom_series(tmp_path / "mixed", _volume(shape=(3, 8, 8)), (1.0, 1.0, 1.0), first)
    other = _volume(shape=(4, 8, 8)) + 1
    write_dicom_series(tmp_path / "mixed" / "b", other, (1.0, 1.0, 1.0), second)
    for f in (tmp_path / "mixed" / "b").iterdir():
        f.rename(tmp_path / "mixed" / f"b_{f.name}")
    with pytest.raises(VolumeFusionError, match="2 DICOM series") as err:
        read_image(tmp_path / "mixed")
    assert first in str(err.value) and second in str(err.value) and "4 files" in str(err.value)
    assert "::SERIES_UID" in str(err.value)
    back, _ = read_image(f"{tmp_path / 'mixed'}::{second}")
    np.testing.assert_array_equal(back, other)


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeFusionError, match="no DICOM series"):
        read_image(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeFusionError, match=r"missing\.nii\.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("fmt", ["nii.gz", "nii", "nrrd", "mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_truncated_file_is_an_error(tmp_path, fmt, dtype):
    path = tmp_path / f"vol.{fmt}"
    write_image(path, _volume(dtype, shape=(8, 32, 32)), Geometry((8, 32, 32), (1, 1, 1), (0, 0, 0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeFusionError, match=rf"vol\.{fmt}: .*(truncated|corrupt)"):
        read_image(path)


def test_truncated_mha_is_reported_as_truncated_without_console_noise(tmp_path, capfd):
    for compress in (True, False):
        path = tmp_path / f"vol{int(compress)}.mha"
        write_image(path, _volume(shape=(8, 32, 32)), Geometry((8, 32, 32), (1, 1, 1), (0, 0, 0)), compress=compress)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = rf"vol{int(compress)}\.mha: truncated file: {len(data) // 2} bytes"
        with pytest.raises(VolumeFusionError, match=expected):
            read_image(path)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 10])
def test_corrupt_or_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(content)
    with pytest.raises(VolumeFusionError, match=r"broken\.nii\.gz: .*(empty|cannot read)"):
        read_image(path)


def test_2d_image_is_an_error(tmp_path):
    _write_sitk(tmp_path / "slice.nrrd", _volume(shape=(1, 9, 11))[0])
    with pytest.raises(VolumeFusionError, match=r"slice\.nrrd: 2D image"):
        read_image(tmp_path / "slice.nrrd")


def test_4d_image_needs_a_channel(tmp_path):
    array = np.stack([_volume(), _volume() + 7])  # (t, z, y, x)
    _write_sitk(tmp_path / "multi.nii.gz", array)
    with pytest.raises(VolumeFusionError, match=r"multi\.nii\.gz: 4D image with 2 volumes.*--channel"):
        read_image(tmp_path / "multi.nii.gz")
    back, geometry = read_image(tmp_path / "multi.nii.gz", channel=1)
    np.testing.assert_array_equal(back, array[1])
    assert geometry.shape_zyx == array.shape[1:]
    with pytest.raises(VolumeFusionError, match="out of range"):
        read_image(tmp_path / "multi.nii.gz", channel=2)


def test_vector_image_needs_a_channel(tmp_path):
    array = np.stack([_volume(), _volume() + 3, _volume() - 3], axis=-1)  # (z, y, x, c)
    _write_sitk(tmp_path / "rgb.mha", array, is_vector=True)
    with pytest.raises(VolumeFusionError, match=r"rgb\.mha: vector image with 3 components.*--channel"):
        read_image(tmp_path / "rgb.mha")
    back, _ = read_image(tmp_path / "rgb.mha", channel=2)
    np.testing.assert_array_equal(back, array[..., 2])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_values_are_an_error(tmp_path, fmt, dtype):
    array = _volume(dtype)
    array[2, 3, 4] = np.nan
    array[0, 0, 0] = np.inf
    array[5, 8, 10] = -np.inf
    write_image(tmp_path / f"nan.{fmt}", array, AXIS_ALIGNED)
    with pytest.raises(VolumeFusionError, match=rf"nan\.{fmt}: 3 voxels are NaN or infinite"):
        read_image(tmp_path / f"nan.{fmt}")


def test_big_endian_float_nifti_with_nan_is_an_error(tmp_path):
    array = _volume(np.float32)
    write_image(tmp_path / "be.nii", array, AXIS_ALIGNED)
    data = bytearray((tmp_path / "be.nii").read_bytes())
    # swap the header fields ITK checks for byte order, then the voxels: the same image, big-endian
    for start, size in [(0, 4), *((40 + 2 * i, 2) for i in range(8)), (70, 2), (72, 2), (108, 4)]:
        data[start : start + size] = data[start : start + size][::-1]
    array[1, 1, 1] = np.nan
    data[352:] = array.astype(">f4").tobytes()
    (tmp_path / "be.nii").write_bytes(bytes(data))
    with pytest.raises(VolumeFusionError, match=r"be\.nii: 1 voxels are NaN or infinite"):
        read_image(tmp_path / "be.nii")


def test_dicom_series_with_missing_slices_is_an_error(tmp_path):
    write_dicom_series(tmp_path / "gappy", _volume(shape=(8, 8, 8)), (2.5, 1.0, 1.0), "1.2.826.0.1.3680043.2.1125.30",
                       origin=(10.0, -20.0, -50.0))
    read_image(tmp_path / "gappy")  # complete: fine
    (tmp_path / "gappy" / "slice004.dcm").unlink()
    (tmp_path / "gappy" / "slice005.dcm").unlink()
    with pytest.raises(VolumeFusionError, match=r"gappy: DICOM series with missing .* 2\.5 mm, found 7\.5 mm"):
        read_image(tmp_path / "gappy")


def test_discover_inputs_expands_folders_globs_and_lists(tmp_path):
    for rel in ["a/one.nii.gz", "a/deep/two.nrrd", "b/three.mha", "b/.hidden.nii.gz", "b/.cache/x.nii.gz"]:
        write_image(tmp_path / rel, _volume(), AXIS_ALIGNED)
    write_dicom_series(tmp_path / "dicom" / "p7", _volume(shape=(3, 8, 8)), (1, 1, 1), "1.2.3.4")
    for f in (tmp_path / "dicom" / "p7").iterdir():  # slices named by UID, as many exports do
        f.rename(f.with_name(f"1.2.3.4.{f.stem[-1]}"))
    (tmp_path / "list.txt").write_text("# images\nb/three.mha\n\na/one.nii.gz\n")
    (tmp_path / "list.csv").write_text("id,image\n1,b/three.mha\n")

    found = discover_inputs([str(tmp_path / "a"), str(tmp_path / "dicom"), str(tmp_path / "b" / "*.mha")])
    assert found == sorted(found, key=str)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/deep/two.nrrd", "a/one.nii.gz", "b/three.mha", "dicom/p7"]
    assert [p.name for p in discover_inputs([tmp_path / "list.txt"])] == ["one.nii.gz", "three.mha"]
    deduplicated = discover_inputs([tmp_path / "list.csv", tmp_path / "b/three.mha"])
    assert [p.name for p in deduplicated] == ["three.mha"]
    assert len(discover_inputs([str(tmp_path / "**" / "*.nii.gz")])) == 1


def test_discover_inputs_takes_only_the_images_of_a_dataset_folder(tmp_path):
    dataset = tmp_path / "Task01"
    for rel in ["imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz"]:
        write_image(dataset / rel, _volume(), AXIS_ALIGNED)
    (dataset / "dataset.json").write_text("{}")
    (dataset / "imagesTs").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in discover_inputs([dataset, tmp_path])] == [
        "Task01/imagesTr/a_0000.nii.gz"]
    write_image(dataset / "imagesTs" / "t_0000.nii.gz", _volume(), AXIS_ALIGNED)
    assert [p.relative_to(tmp_path).as_posix() for p in discover_inputs([tmp_path])] == [
        "Task01/imagesTs/t_0000.nii.gz"]
    for rel in ["imagesTr", "imagesTs"]:
        for f in (dataset / rel).iterdir():
            f.unlink()
    with pytest.raises(VolumeFusionError, match=r"Task01: dataset folder \(dataset.json\) with no images"):
        discover_inputs([dataset])


def test_discover_inputs_reports_inputs_that_match_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "good.nii.gz", _volume(), AXIS_ALIGNED)
    (tmp_path / "bad.txt").write_text("nowhere.nii.gz\ngood.nii.gz\n")
    (tmp_path / "blank.txt").write_text("# nothing\n")
    with pytest.raises(VolumeFusionError, match="no NIfTI/NRRD/MHA images or DICOM series"):
        discover_inputs([tmp_path / "empty"])
    errors: list = []
    found = discover_inputs([tmp_path / "empty", tmp_path / "bad.txt", tmp_path / "blank.txt",
                             str(tmp_path / "*.nrrd"), tmp_path / "gone.nii"], errors=errors)
    assert found == [tmp_path / "good.nii.gz"]  # the list's other entry still counts
    reasons = " | ".join(reason for _, reason in errors)
    assert len(errors) == 5
    for expected in ("no NIfTI", "nowhere.nii.gz: file not found", "the list is empty",
                     "pattern matches no images", "gone.nii: file not found"):
        assert expected in reasons


@pytest.mark.parametrize("path, case_id", [
    ("data/liver_3.nii.gz", "liver_3"), ("x/ct.v2.NRRD", "ct.v2"), ("scan.mha", "scan"),
    ("dicom/patient7", "patient7"),
])
def test_case_id_from_path(path, case_id):
    assert case_id_from_path(path) == case_id


def test_case_id_of_a_picked_series_is_unique_per_series():
    a, b = case_id_from_path("dicom/p7::1.2.3"), case_id_from_path("dicom/p7::1.2.4")
    assert a.startswith("p7_") and b.startswith("p7_") and a != b


def test_reads_the_slicerio_chest_ct():
    from volumefusion.data.samples import chest_ct, chest_ct_label_names

    image_path, label_path = chest_ct()
    image, geometry = read_image(image_path)
    label, label_geometry = read_image(label_path)
    assert image.shape == label.shape == (34, 128, 128)
    assert label_geometry == geometry
    np.testing.assert_allclose(geometry.spacing_zyx, (10.0, 3.046875954, 3.046875954), rtol=1e-6)
    assert image.min() < -900 and image.max() > 1000  # HU: air and bone
    assert set(np.unique(label)) == set(range(8))
    names = chest_ct_label_names()
    assert len(names) == 8 and names[5] == "right lung" and names[0] == "background"


@pytest.mark.parametrize(("name", "home"), [("atomic_write_text", "volumefusion.files"),
                                            ("check_writable_folder", "volumefusion.files")])
def test_names_that_left_io_still_import_from_it_for_one_release_with_a_warning(name, home):
    import importlib

    import volumefusion.io

    with pytest.warns(DeprecationWarning, match=f"volumefusion.io.{name} moved to {home}.{name}"):
        alias = getattr(volumefusion.io, name)
    assert alias is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        volumefusion.io.no_such_name  # noqa: B018
