"""prepare: per-case preprocessing and its inverse, and the robust batch run into a store."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from volumefusion import VolumeFusionError
from volumefusion.cli import main as cli_main
from volumefusion.data.prepare import prepare, source_version
from volumefusion.data.samples import chest_ct, chest_ct_label_names
from volumefusion.data.store import Store
from volumefusion.io import Geometry, read_image, write_image
from volumefusion.preprocess import PrepareSettings, body_box, prepared_geometry, preprocess_case, restore_to_original

SHAPE = (12, 40, 48)
GEOMETRY = Geometry(SHAPE, (2.5, 0.8, 0.8), (30.0, -12.5, 100.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))


def ct_case(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU with an elliptic body, a separate table under it, and a 2-class label inside the body."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    cy, cx = shape[1] * 0.42 + rng.uniform(-1, 1), shape[2] / 2 + rng.uniform(-2, 2)
    body = ((y - cy) / (shape[1] * 0.32)) ** 2 + ((x - cx) / (shape[2] * 0.4)) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    image[:, -3:, 4:-4] = 300  # the table: bright, but not connected to the body
    label = np.zeros(shape, np.uint8)
    label[((z - shape[0] / 2) / 3) ** 2 + ((y - cy) / 5) ** 2 + ((x - cx) / 6) ** 2 < 1] = 1
    label[2:5, int(cy) - 2:int(cy) + 2, int(cx) + 6:int(cx) + 10] = 2
    return image.astype(np.int16), label


def write_cases(folder, seeds, fmt="nii.gz", label_folder=None, shape=SHAPE):
    geometry = dataclasses.replace(GEOMETRY, shape_zyx=shape)
    paths = []
    for seed in seeds:
        image, label = ct_case(seed, shape)
        path = folder / f"case{seed}.{fmt}"
        write_image(path, image, geometry)
        if label_folder is not None:
            write_image(label_folder / f"case{seed}.{fmt}", label, geometry)
        paths.append(path)
    return paths


def snapshot(store_path) -> dict:
    """Everything a store holds per case: record and array contents."""
    store = Store.open(store_path)
    out = {}
    for record in map(store.case, store.ids):
        label = store.label(record.id)
        out[record.id] = (record.to_dict(), store.image(record.id).read(),
                          None if label is None else label.read())
    return out


def assert_same_store(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for case_id in a:
        assert a[case_id][0] == b[case_id][0]
        np.testing.assert_array_equal(a[case_id][1], b[case_id][1])
        np.testing.assert_array_equal(a[case_id][2], b[case_id][2])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ----------------------------------------------------------------------------------------- per case


@pytest.fixture(scope="module")
def chest():
    image_path, label_path = chest_ct()
    image, geometry = read_image(image_path)
    label, _ = read_image(label_path)
    return image, geometry, label, image_path


@pytest.mark.parametrize("code", ["LPS", "RAI", "SLP"])
def test_reorientation_matches_sitk_dicom_orient(chest, code):
    image, geometry, _, path = chest
    prepared = preprocess_case(image, geometry, PrepareSettings(orientation=code, crop_to_body=False))
    reference = sitk.DICOMOrient(sitk.ReadImage(str(path)), code)
    np.testing.assert_array_equal(prepared.image, sitk.GetArrayFromImage(reference))
    expected = Geometry.from_sitk(reference)
    got = prepared_geometry(prepared.restore)
    assert got.shape_zyx == expected.shape_zyx and got.spacing_zyx == expected.spacing_zyx
    np.testing.assert_allclose(got.origin, expected.origin, atol=1e-9)
    np.testing.assert_array_equal(got.direction, expected.direction)


def test_prepared_case_types_and_canonical_orientation(chest):
    image, geometry, label, _ = chest
    prepared = preprocess_case(image, geometry, PrepareSettings(), label)
    assert prepared.image.dtype == np.int16 and prepared.label.dtype == np.uint8
    assert prepared.label.shape == prepared.image.shape
    assert prepared_geometry(prepared.restore).direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    json.dumps(prepared.restore)  # recorded in the store as JSON


def test_body_box_is_the_largest_component_and_excludes_the_table():
    image, _ = ct_case(0)
    box = body_box(image, -600)
    body = image[:, :-3] > -600
    ys, xs = np.nonzero(body.any(axis=0))
    assert box == ((0, SHAPE[0]), (ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1))
    assert body_box(np.full(SHAPE, -1000, np.int16), -600) == ((0, 12), (0, 40), (0, 48))


def test_crop_to_body_and_restore_give_back_the_original_labels_exactly(chest):
    image, geometry, label, _ = chest
    prepared = preprocess_case(image, geometry, PrepareSettings(), label)
    assert prepared.image.size < image.size  # cropped to the body
    np.testing.assert_array_equal(restore_to_original(prepared.label, prepared.restore), label)
    restored_image = restore_to_original(prepared.image, prepared.restore, fill=-1024)
    crop = restore_to_original(np.ones_like(prepared.label), prepared.restore).astype(bool)
    np.testing.assert_array_equal(restored_image[crop], image[crop])


def test_crop_grows_to_keep_labelled_voxels_outside_the_body():
    image, label = ct_case(1)
    label[0, 0, 0] = 2  # in the air corner, outside the body box
    prepared = preprocess_case(image, GEOMETRY, PrepareSettings(), label)
    np.testing.assert_array_equal(restore_to_original(prepared.label, prepared.restore), label)
    assert prepared.body_box != tuple((0, s) for s in prepared.image.shape)  # the body box stays tight


def test_restore_maps_probability_maps_channel_by_channel():
    image, label = ct_case(2)
    prepared = preprocess_case(image, GEOMETRY, PrepareSettings(spacing_zyx=(5.0, 1.6, 1.6)), label)
    probabilities = np.stack([(prepared.label == k).astype(np.float32) for k in range(3)])
    restored = restore_to_original(probabilities, prepared.restore, order=1)
    assert restored.shape == (3,) + SHAPE and restored.dtype == np.float32
    np.testing.assert_allclose(restored[1], restore_to_original(probabilities[1], prepared.restore, order=1))


def test_resampling_changes_spacing_and_restores_onto_the_original_grid(chest):
    image, geometry, label, _ = chest
    settings = PrepareSettings(spacing_zyx=(5.0, 4.0, 4.0))
    prepared = preprocess_case(image, geometry, settings, label)
    assert prepared.spacing_zyx == (5.0, 4.0, 4.0)
    assert prepared_geometry(prepared.restore).spacing_zyx == (5.0, 4.0, 4.0)
    restored = restore_to_original(prepared.label, prepared.restore)
    assert restored.shape == label.shape
    for k in (5, 6, 7):  # lungs and soft tissue: large structures survive 3 mm -> 4 mm and back
        assert dice(restored == k, label == k) > 0.85


def test_prepared_geometry_puts_each_voxel_where_it_was(chest):
    image, geometry, _, _ = chest
    prepared = preprocess_case(image, geometry, PrepareSettings())
    moved = sitk.GetImageFromArray(prepared.image)
    prepared_geometry(prepared.restore).apply_to(moved)
    reference = sitk.Image(list(reversed(geometry.shape_zyx)), sitk.sitkInt16)
    geometry.apply_to(reference)
    resampled = sitk.Resample(moved, reference, sitk.Transform(), sitk.sitkNearestNeighbor, -5000)
    back = sitk.GetArrayFromImage(resampled)
    inside = back != -5000
    assert inside.sum() == prepared.image.size
    np.testing.assert_array_equal(back[inside], image[inside])


@pytest.mark.parametrize("bad, message", [
    (np.full(SHAPE, 300, np.int16), "0..255"),
    (np.full(SHAPE, 0.5, np.float32), "non-integer"),
])
def test_bad_label_values_are_errors(bad, message):
    with pytest.raises(VolumeFusionError, match=message):
        preprocess_case(ct_case(0)[0], GEOMETRY, PrepareSettings(), bad)


def test_settings_validate_and_round_trip():
    settings = PrepareSettings(spacing_zyx=(2, 1, 1), crop_to_body=False, orientation="ras")
    assert settings.orientation == "RAS" and settings.spacing_zyx == (2.0, 1.0, 1.0)
    assert PrepareSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    with pytest.raises(VolumeFusionError, match="orientation"):
        PrepareSettings(orientation="LLS")
    with pytest.raises(VolumeFusionError, match="spacing"):
        PrepareSettings(spacing_zyx=(1, 0, 1))


# ----------------------------------------------------------------------------------------- batch


def test_prepare_is_idempotent(tmp_path):
    write_cases(tmp_path / "in", [1, 2, 3])
    first = prepare([str(tmp_path / "in")], tmp_path / "store")
    assert first.ok and sorted(first.prepared) == ["case1", "case2", "case3"]
    before = snapshot(tmp_path / "store")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*")}
    second = prepare([str(tmp_path / "in")], tmp_path / "store")
    assert second.ok and second.prepared == [] and sorted(second.skipped) == ["case1", "case2", "case3"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*")} == stamps
    assert_same_store(before, snapshot(tmp_path / "store"))
    assert all(Store.open(tmp_path / "store").verify(c) for c in before)


def test_prepare_resumes_after_a_kill(tmp_path):
    write_cases(tmp_path / "in", [1, 2, 3])
    store = tmp_path / "store"
    prepare([str(tmp_path / "in")], store)
    before = snapshot(store)
    # what a kill leaves behind: arrays of case2 without its record, temporary files of a half write
    (store / "cases" / "case2.json").unlink()
    (store / "arrays" / "case2" / ".image.b2nd.k1ll3d.tmp.b2nd").write_bytes(b"partial")
    (store / "cases" / ".case2.json.k1ll3d.tmp.json").write_text('{"id": "ca')
    (store / "arrays" / "case3" / "image.b2nd").write_bytes(b"stale garbage")  # no record
    (store / "cases" / "case3.json").unlink()
    assert Store.open(store).ids == ["case1"]
    summary = prepare([str(tmp_path / "in")], store)
    assert summary.ok and sorted(summary.prepared) == ["case2", "case3"] and summary.skipped == ["case1"]
    assert sorted(p.name for p in (store / "arrays" / "case2").iterdir()) == ["image.b2nd"]
    assert not list((store / "cases").glob(".*"))
    assert_same_store(before, snapshot(store))


KILLED_WRITER = """
import sys, time
from volumefusion.data import store
from volumefusion.data.prepare import prepare
write_array = store.write_array
def write_then_hang(path, array):
    write_array(path, array)
    print(path.parent.name, flush=True)
    time.sleep(120)
store.write_array = write_then_hang
prepare([sys.argv[1]], sys.argv[2])
"""


def test_a_prepare_killed_mid_write_leaves_a_private_folder_that_the_next_prepare_removes(
        tmp_path, caplog, monkeypatch):
    from volumefusion.data.store import private_folder

    write_cases(tmp_path / "in", [1, 2])
    store = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "in"), str(store)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    private = store / "arrays" / writer.stdout.readline().strip()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert private.name.startswith(".case") and (private / "image.b2nd").is_file()
    running = private_folder(store, "case9")  # this process's: a writer still at work
    running.mkdir()
    elsewhere = store / "arrays" / ".case9.123-another-machine.0123456789ab.tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(logging.getLogger("volumefusion"), "propagate", True)  # the CLI's setup() turns it off
    with caplog.at_level(logging.INFO, logger="volumefusion"):
        summary = prepare([str(tmp_path / "in")], store)
    assert summary.ok and sorted(summary.prepared) == ["case1", "case2"]
    assert not private.exists() and running.is_dir() and elsewhere.is_dir()
    assert "removed 1 temporary folder(s) of killed prepare runs" in caplog.text and "kept 2" in caplog.text


def test_a_file_system_without_locks_is_said_once_and_the_store_is_still_made(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def refuse(handle, operation):  # what flock does on a parallel file system mounted without locks
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(logging.getLogger("volumefusion"), "propagate", True)  # the CLI's setup() turns it off
    write_cases(tmp_path / "in", [1, 2])
    with caplog.at_level(logging.WARNING, logger="volumefusion"):
        summary = prepare([str(tmp_path / "in")], tmp_path / "store")
    assert summary.ok and sorted(summary.prepared) == ["case1", "case2"]
    assert Store.open(tmp_path / "store").ids == ["case1", "case2"]
    # one record (earlier CLI tests may leave caplog's handler on the package logger too: the same record twice)
    warnings = {id(r): r.getMessage() for r in caplog.records if "refuses file locks" in r.getMessage()}
    warnings = list(warnings.values())
    assert len(warnings) == 1 and "--shard" in warnings[0], warnings


def test_two_shards_give_the_same_store_as_one_run(tmp_path):
    write_cases(tmp_path / "in", range(8))  # ids that hash to both shards
    whole = prepare([str(tmp_path / "in")], tmp_path / "one")
    parts = [prepare([str(tmp_path / "in")], tmp_path / "sharded", shard=(i, 2), workers=2 if i == 0 else 1)
             for i in range(2)]
    assert all(p.ok for p in parts) and whole.ok
    assert not set(parts[0].prepared) & set(parts[1].prepared)
    assert sorted(parts[0].prepared + parts[1].prepared) == sorted(whole.prepared)
    assert all(p.prepared for p in parts)  # both shards did some of the work
    assert_same_store(snapshot(tmp_path / "one"), snapshot(tmp_path / "sharded"))


def test_each_bad_input_is_reported_while_good_cases_land(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_cases(images, [1, 2], label_folder=labels)
    good = ct_case(3)[0]
    corrupt = images / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x00garbage" * 50)
    write_image(images / "truncated.nii.gz", good, GEOMETRY)
    data = (images / "truncated.nii.gz").read_bytes()
    (images / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(sitk.GetImageFromArray(good[0]), str(images / "flat.nrrd"))
    four_d = sitk.GetImageFromArray(np.stack([good, good]), isVector=False)
    sitk.WriteImage(four_d, str(images / "fourd.nii.gz"))
    nan = good.astype(np.float32)
    nan[1, 2, 3] = np.nan
    write_image(images / "nan.mha", nan, GEOMETRY)
    write_image(images / "shifted.nii.gz", good, GEOMETRY)  # its label sits on another grid
    write_image(labels / "shifted.nii.gz", ct_case(3)[1],
                Geometry(SHAPE, (2.5, 0.8, 0.8), (31.0, -12.5, 100.0), GEOMETRY.direction))
    write_image(images / "case1.nrrd", good, GEOMETRY)  # same id as case1.nii.gz
    for name in ("corrupt", "truncated", "flat", "fourd", "nan", "case1"):
        write_image(labels / f"{name}.nii.gz", ct_case(3)[1], GEOMETRY)
    (tmp_path / "empty").mkdir()

    summary = prepare([str(images), str(tmp_path / "empty")], tmp_path / "store", label_dir=labels)
    assert not summary.ok
    assert summary.prepared == ["case2"]
    reasons = "\n".join(reason for _, reason in summary.failed)
    for expected in [r"corrupt\.nii\.gz: cannot read image", r"truncated\.nii\.gz: truncated",
                     r"flat\.nrrd: 2D image", r"fourd\.nii\.gz: 4D image with 2 volumes.*--channel",
                     r"nan\.mha: 1 voxels are NaN",
                     r"shifted\.nii\.gz: label grid does not match .*: origin \(31, -12\.5, 100\) vs",
                     r"case1\.nii\.gz: duplicate case id 'case1'", r"case1\.nrrd: duplicate case id 'case1'",
                     r"empty: folder holds no NIfTI"]:
        assert len(re.findall(expected, reasons)) == 1, expected
    assert len(summary.failed) == 9 and summary.total == 10
    assert Store.open(tmp_path / "store").ids == ["case2"]
    assert "FAILED" in summary.format() and "9 failed" in summary.format()


def test_files_sharing_a_name_in_different_folders_get_distinct_ids(tmp_path):
    for patient in ("p1", "p2"):
        write_image(tmp_path / "in" / patient / "ct.nii.gz", ct_case(int(patient[1]))[0], GEOMETRY)
    summary = prepare([str(tmp_path / "in")], tmp_path / "store")
    assert summary.ok and sorted(summary.prepared) == ["p1_ct", "p2_ct"]


def test_adding_labels_later_redoes_only_those_cases(tmp_path):
    write_cases(tmp_path / "in", [1, 2], label_folder=tmp_path / "all_labels")
    (tmp_path / "labels").mkdir()
    (tmp_path / "all_labels" / "case1.nii.gz").rename(tmp_path / "labels" / "case1.nii.gz")
    first = prepare([str(tmp_path / "in")], tmp_path / "store")
    assert first.ok and Store.open(tmp_path / "store").label("case1") is None
    second = prepare([str(tmp_path / "in" / "case1.nii.gz")], tmp_path / "store",
                     label_dir=tmp_path / "labels")
    assert second.prepared == ["case1"]
    record = Store.open(tmp_path / "store").case("case1")
    assert record.label_classes == [1, 2]
    np.testing.assert_array_equal(restore_to_original(Store.open(tmp_path / "store").label("case1").read(),
                                                      record.restore), ct_case(1)[1])


def test_a_source_replaced_in_place_is_prepared_again(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("volumefusion"), "propagate", True)  # the CLI's setup() turns it off
    write_cases(tmp_path / "in", [1, 2])
    store = tmp_path / "store"
    assert prepare([str(tmp_path / "in")], store).ok
    # another scan under the same name: other size, other orientation
    image = ct_case(3, shape=(10, 40, 48))[0]
    geometry = Geometry((10, 40, 48), (2.5, 0.8, 0.8), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(tmp_path / "in" / "case1.nii.gz", image, geometry)
    with caplog.at_level(logging.INFO, logger="volumefusion"):
        second = prepare([str(tmp_path / "in")], store)
    assert second.ok and second.prepared == ["case1"] and second.skipped == ["case2"]
    assert "case1: source changed since it was prepared: re-preparing" in caplog.text
    expected = preprocess_case(*read_image(tmp_path / "in" / "case1.nii.gz"), PrepareSettings())
    stored = Store.open(store)
    np.testing.assert_array_equal(stored.image("case1").read(), expected.image)
    assert stored.case("case1").restore == expected.restore
    assert all(stored.verify(c) for c in stored.ids)
    third = prepare([str(tmp_path / "in")], store)
    assert third.prepared == [] and sorted(third.skipped) == ["case1", "case2"]


def test_a_label_replaced_in_place_is_prepared_again(tmp_path):
    write_cases(tmp_path / "in", [1], label_folder=tmp_path / "labels")
    store = tmp_path / "store"
    assert prepare([str(tmp_path / "in")], store, label_dir=tmp_path / "labels").ok
    label = np.zeros(SHAPE, np.uint8)
    label[5:7, 10:20, 20:30] = 3
    write_image(tmp_path / "labels" / "case1.nii.gz", label, GEOMETRY)
    summary = prepare([str(tmp_path / "in")], store, label_dir=tmp_path / "labels")
    assert summary.ok and summary.prepared == ["case1"]
    assert Store.open(store).case("case1").label_classes == [3]


def test_records_without_a_source_version_still_count_as_done(tmp_path):
    write_cases(tmp_path / "in", [1])
    store = tmp_path / "store"
    assert prepare([str(tmp_path / "in")], store).ok
    record_file = store / "cases" / "case1.json"
    record = json.loads(record_file.read_text())
    del record["source_version"]  # a store written before versions were recorded
    record_file.write_text(json.dumps(record))
    source = tmp_path / "in" / "case1.nii.gz"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    summary = prepare([str(tmp_path / "in")], store)
    assert summary.ok and summary.prepared == [] and summary.skipped == ["case1"]


def test_a_dicom_folder_version_follows_its_files(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"a" * 10)
    first = source_version(str(folder))
    assert first["files"] == 1 and first["size"] == 10
    assert source_version(f"{folder}::1.2.3") == first  # a picked series: the folder's files
    (folder / ".DS_Store").write_bytes(b"x")  # hidden files are not slices
    assert source_version(str(folder)) == first
    (folder / "2.dcm").write_bytes(b"b" * 5)
    assert source_version(str(folder))["files"] == 2 and source_version(str(folder))["size"] == 15


def test_a_case_id_already_stored_from_another_file_is_a_duplicate(tmp_path):
    write_cases(tmp_path / "a", [1])
    write_cases(tmp_path / "b", [1])
    assert prepare([str(tmp_path / "a")], tmp_path / "store").ok
    summary = prepare([str(tmp_path / "b" / "case1.nii.gz")], tmp_path / "store")
    assert not summary.ok and "already holds it from" in summary.failed[0][1]


RACE = """
import json, os, sys, time
from volumefusion.data.prepare import prepare

folder, store, ready, go, out = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
summary = prepare([folder], store)
with open(out, "w") as f:
    json.dump({"prepared": summary.prepared, "skipped": summary.skipped, "failed": [r for _, r in summary.failed]}, f)
"""


def test_two_prepare_runs_at_once_with_colliding_case_ids_report_only_what_the_store_holds(tmp_path):
    """Two real processes start together on one store, each with its own case0..case5: every case
    ends up from one of them, that one reports it prepared, the other a duplicate."""
    import volumefusion

    runs = {"a": SHAPE, "b": (10, 32, 40)}
    for name, shape in runs.items():
        write_cases(tmp_path / name, range(6), shape=shape)
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = dict(os.environ, PYTHONPATH=str(Path(volumefusion.__file__).parents[1]), OMP_NUM_THREADS="1")
    store, go = tmp_path / "store", tmp_path / "go"
    procs = {name: subprocess.Popen([sys.executable, str(script), str(tmp_path / name), str(store),
                                     str(tmp_path / f"{name}.ready"), str(go), str(tmp_path / f"{name}.json")],
                                    env=env, stderr=subprocess.PIPE, text=True) for name in runs}
    deadline = time.time() + 300
    while not all((tmp_path / f"{name}.ready").exists() for name in runs):
        assert time.time() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.01)
    go.touch()
    for proc in procs.values():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    opened = Store.open(store)
    assert sorted(reports["a"]["prepared"] + reports["b"]["prepared"]) == opened.ids == [f"case{i}" for i in range(6)]
    for name, report in reports.items():
        for case_id in report["prepared"]:  # what the run says it prepared is what the store holds
            assert opened.case(case_id).source == str(tmp_path / name / f"{case_id}.nii.gz")
            assert opened.verify(case_id)  # and the arrays beside the record are that run's
        assert len(report["failed"]) == 6 - len(report["prepared"]) and not report["skipped"]
        assert all("duplicate case id" in reason for reason in report["failed"])


def test_unwritable_output_folder_is_an_error(tmp_path):
    write_cases(tmp_path / "in", [1])
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(VolumeFusionError, match="store: cannot be created for --out: .*file is a file"):
        prepare([str(tmp_path / "in")], tmp_path / "file" / "store")
    with pytest.raises(VolumeFusionError, match="is a file"):
        prepare([str(tmp_path / "in")], tmp_path / "file")


def test_a_folder_of_other_files_is_refused_as_output_but_a_store_or_empty_folder_is_not(tmp_path):
    write_cases(tmp_path / "in", [1])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "important.txt").write_text("keep me")
    with pytest.raises(VolumeFusionError, match=r"holds other files \(important\.txt\) and is not a store"):
        prepare([str(tmp_path / "in")], tmp_path / "docs")
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["important.txt"]
    with pytest.raises(VolumeFusionError, match="not a store"):  # the raw image folder itself
        prepare([str(tmp_path / "in")], tmp_path / "in")
    (tmp_path / "empty" / ".DS_Store").parent.mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    assert prepare([str(tmp_path / "in")], tmp_path / "empty").ok
    (tmp_path / "empty" / "notes.txt").write_text("a store may hold the user's notes")
    assert prepare([str(tmp_path / "in")], tmp_path / "empty").skipped == ["case1"]


def test_label_maps_without_names_get_their_classes_named_for_finetuning(tmp_path, capsys):
    write_cases(tmp_path / "images", [1, 2], label_folder=tmp_path / "labels")
    label = ct_case(3)[1]
    label[label == 2] = 7  # classes need not be contiguous
    write_cases(tmp_path / "more", [3])
    write_image(tmp_path / "more_labels" / "case3.nii.gz", label, GEOMETRY)
    args = ["prepare", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
            "--out", str(tmp_path / "store")]
    assert cli_main(args) == 0
    assert Store.open(tmp_path / "store").label_names == {0: "background", 1: "label_1", 2: "label_2"}
    assert prepare([str(tmp_path / "more")], tmp_path / "store", label_dir=tmp_path / "more_labels").ok
    names = {0: "background", 1: "label_1", 2: "label_2", 7: "label_7"}
    assert Store.open(tmp_path / "store").label_names == names
    assert prepare([str(tmp_path / "images")], tmp_path / "plain").ok  # no labels, no names
    assert Store.open(tmp_path / "plain").label_names is None


def _live_processes_in_group(group: int) -> list[int]:
    """Process ids in process group ``group`` that are not zombies (Linux /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if int(pgrp) == group and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _blocking_input(folder: Path, pipe_folder: Path) -> Path:
    """``folder/blocked.mhd``, a MetaImage header whose data file is a named pipe: a worker reading it
    waits until the pipe is opened for writing (:func:`_release`), so a run is still busy with this
    case for as long as a test needs, however fast or slow the machine. Returns the pipe."""
    pipe_folder.mkdir(parents=True)
    pipe = pipe_folder / "data.raw"
    os.mkfifo(pipe)
    (folder / "blocked.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 48 40 12\nElementType = MET_SHORT\n"
        f"ElementSpacing = 0.8 0.8 2.5\nElementDataFile = {pipe}\n")
    return pipe


def _release(pipe: Path) -> None:
    """Let a reader waiting on ``pipe`` go on (it reads end-of-file: a truncated case); no-op without one."""
    with contextlib.suppress(OSError):  # ENXIO: nobody is reading
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))


def _start_blocked_prepare(tmp_path, cases: int = 11):
    """``prepare --workers 2`` in its own process group over ``cases`` cases and one that blocks
    (sorted first, so one worker holds it); returns ``(process, pipe)`` once every other case is in
    the store, i.e. with one worker blocked and the run unable to finish."""
    write_cases(tmp_path / "in", range(cases), shape=(24, 64, 64))
    pipe = _blocking_input(tmp_path / "in", tmp_path / "pipe")
    store = tmp_path / "store"
    command = [sys.executable, "-m", "volumefusion", "prepare", str(tmp_path / "in"), "--out", str(store),
               "--workers", "2", "--no-crop"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 600  # a bound for a hung run, not a speed requirement
    while len(list((store / "cases").glob("*.json"))) < cases:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.05)
    return proc, pipe


def _wait_until_gone(group: int, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while _live_processes_in_group(group):
        assert time.monotonic() < deadline, f"processes outlived prepare: {_live_processes_in_group(group)}"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("whole_group", [True, False], ids=["group", "parent"])
def test_sigterm_stops_prepare_and_its_workers_with_status_143(tmp_path, whole_group):
    proc, pipe = _start_blocked_prepare(tmp_path)
    try:
        if whole_group:  # what SLURM and `timeout --foreground`-less job runners do
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while proc.poll() is None:  # a signalled parent waits for its busy worker's case to end
            assert time.monotonic() < deadline, "prepare did not stop"
            _release(pipe)
            time.sleep(0.05)
        assert proc.returncode == 143, (tmp_path / "stderr.txt").read_text()
        assert "terminated" in (tmp_path / "stderr.txt").read_text()
        _wait_until_gone(proc.pid)  # workers and resource tracker follow the parent
        assert len(list((tmp_path / "store" / "cases").glob("*.json"))) == 11  # the blocked case never finished
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
def test_kill_9_of_prepare_takes_its_workers_and_resource_tracker_with_it(tmp_path):
    proc, pipe = _start_blocked_prepare(tmp_path, cases=3)
    try:
        assert len(_live_processes_in_group(proc.pid)) >= 3  # parent, two workers (one blocked), tracker
        proc.kill()  # SIGKILL: no handler runs, nothing is shut down
        proc.wait()
        _wait_until_gone(proc.pid)
    finally:
        _release(pipe)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_msd_dataset_with_the_real_chest_ct_keeps_labels_and_names(tmp_path):
    image_path, label_path = chest_ct()
    dataset = tmp_path / "Task01_Chest"
    write_image(dataset / "imagesTr" / "odd.nii.gz", ct_case(1)[0], GEOMETRY)
    odd_label = ct_case(1)[1]
    odd_label[odd_label == 2] = 9  # 9 is not declared in dataset.json
    write_image(dataset / "labelsTr" / "odd.nii.gz", odd_label, GEOMETRY)
    names = chest_ct_label_names()
    (dataset / "dataset.json").write_text(json.dumps({
        "name": "chest", "labels": {str(k): v for k, v in names.items()},
        "training": [{"image": str(image_path), "label": str(label_path)},
                     {"image": "./imagesTr/odd.nii.gz", "label": "./labelsTr/odd.nii.gz"}],
    }))
    summary = prepare([str(dataset)], tmp_path / "store")
    assert summary.prepared == ["CTChest4"]
    assert len(summary.failed) == 1
    assert "odd.nii.gz: label values [9] are not in dataset.json labels" in summary.failed[0][1]
    store = Store.open(tmp_path / "store")
    assert store.label_names == names
    record = store.case("CTChest4")
    assert record.label_classes == [1, 2, 3, 4, 5, 6, 7] and record.label_source == str(label_path)
    label, _ = read_image(label_path)
    np.testing.assert_array_equal(restore_to_original(store.label("CTChest4").read(), record.restore), label)


def test_nnunet_v2_dataset_uses_channel_files_and_name_to_value_labels(tmp_path):
    dataset = tmp_path / "Dataset002_Demo"
    for seed in (1, 2):
        image, label = ct_case(seed)
        write_image(dataset / "imagesTr" / f"demo_{seed:03d}_0000.nii.gz", image, GEOMETRY)
        write_image(dataset / "imagesTr" / f"demo_{seed:03d}_0001.nii.gz", image + 5, GEOMETRY)
        write_image(dataset / "labelsTr" / f"demo_{seed:03d}.nii.gz", label, GEOMETRY)
    meta = {"channel_names": {"0": "CT", "1": "CT2"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(VolumeFusionError, match="2 channels.*--channel"):
        prepare([str(dataset)], tmp_path / "store")
    summary = prepare([str(dataset)], tmp_path / "store", channel=1)
    assert summary.ok and summary.prepared == ["demo_001", "demo_002"]
    store = Store.open(tmp_path / "store")
    assert store.label_names == {0: "background", 1: "a", 2: "b"}
    source, _ = read_image(dataset / "imagesTr" / "demo_001_0001.nii.gz")
    record = store.case("demo_001")
    restored = restore_to_original(store.image("demo_001").read(), record.restore)
    crop = restore_to_original(np.ones(record.shape, np.uint8), record.restore)
    np.testing.assert_array_equal(restored[crop > 0], source[crop > 0])


def test_label_dir_matches_nnunet_channel_names_and_reports_missing_labels(tmp_path):
    image, label = ct_case(1)
    write_image(tmp_path / "img" / "liver_7_0000.nii.gz", image, GEOMETRY)
    write_image(tmp_path / "img" / "liver_8_0000.nii.gz", image, GEOMETRY)
    write_image(tmp_path / "lab" / "liver_7.nii.gz", label, GEOMETRY)
    summary = prepare([str(tmp_path / "img")], tmp_path / "store", label_dir=tmp_path / "lab",
                      label_names={0: "background", 1: "x", 2: "y"})
    assert summary.prepared == ["liver_7_0000"]
    assert "no label file for case 'liver_8_0000'" in summary.failed[0][1]
    assert Store.open(tmp_path / "store").label_names == {0: "background", 1: "x", 2: "y"}


def test_cli_exit_status_says_whether_anything_failed(tmp_path, capsys):
    write_cases(tmp_path / "in", [1])
    assert cli_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "store"), "--no-crop"]) == 0
    assert "1 prepared" in capsys.readouterr().out
    (tmp_path / "in" / "bad.nii.gz").write_bytes(gzip.compress(b"nonsense"))
    assert cli_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "store"), "--no-crop"]) == 1
    out = capsys.readouterr().out
    assert "1 already done" in out and "FAILED" in out and "bad.nii.gz" in out
    assert Store.open(tmp_path / "store").settings["crop_to_body"] is False
    other_settings = ["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "store")]
    assert cli_main(other_settings) == 2


def test_cli_help_explains_inputs_resume_and_sharding(capsys):
    with pytest.raises(SystemExit):
        cli_main(["prepare", "--help"])
    text = capsys.readouterr().out
    for phrase in ("dataset.json", "--shard", "SLURM_ARRAY_TASK_ID", "re-run", "::SERIES_UID", "--spacing"):
        assert phrase in text


def test_the_body_threshold_help_states_the_default_prepare_uses(capsys):
    from volumefusion.preprocess import BODY_THRESHOLD_HU

    with pytest.raises(SystemExit):
        cli_main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    stated = {float(v) for v in re.findall(r"HU > (-?\d+)", text) + re.findall(r"body box \(default: (-?\d+)\)", text)}
    assert stated == {BODY_THRESHOLD_HU} == {PrepareSettings().body_threshold}


def test_names_without_an_ascii_form_keep_distinct_readable_case_ids(tmp_path):
    image, _ = ct_case(1)
    for name in ("肝臓", "脾臓", "Müller_3"):
        write_image(tmp_path / "in" / f"{name}.nii.gz", image, GEOMETRY)
    summary = prepare([str(tmp_path / "in")], tmp_path / "store")
    assert not summary.failed  # no "duplicate case id 'case'"
    ids = sorted(summary.prepared)
    assert "Muller_3" in ids and len(ids) == 3
    assert all(re.fullmatch(r"case_[0-9a-f]{8}", i) for i in ids if i != "Muller_3")


def test_an_unknown_flag_after_the_command_shows_that_commands_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["prepare", "in/", "--out", "store", "--workerz", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: volumefusion prepare") and "unrecognized arguments: --workerz 2" in err


def test_prepare_logs_a_line_per_case_when_stderr_is_not_a_terminal(tmp_path, capsys):
    write_cases(tmp_path / "in", [1, 2])
    assert cli_main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "store"), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"INFO case[12]: prepared \(1 of 2\)", err) and re.search(r"case[12]: prepared \(2 of 2\)", err)


def test_suspicious_values_are_warned_naming_file_and_value_and_listed_in_the_summary(tmp_path, capsys):
    image, _ = ct_case(1)
    folder = tmp_path / "in"
    write_cases(folder, [0])  # a plausible CT: no warning
    huge = image.astype(np.float32)
    huge[0, 0, :2] = (-1e9, 1e9)
    write_image(folder / "huge.nii.gz", huge, GEOMETRY)
    noise = np.random.default_rng(0).integers(-128, 128, SHAPE).astype(np.int8)
    write_image(folder / "noise.nii.gz", noise, GEOMETRY)
    write_image(folder / "fine.nii.gz", image, dataclasses.replace(GEOMETRY, spacing_zyx=(0.1, 0.1, 0.1)))
    write_image(folder / "coarse.nii.gz", image, dataclasses.replace(GEOMETRY, spacing_zyx=(50.0, 0.8, 0.8)))
    assert cli_main(["prepare", str(folder), "--out", str(tmp_path / "store"), "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "5 prepared, 0 already done, 0 failed, 4 warning(s)" in out  # kept going: every case is stored
    expected = {
        "huge": "values -1e+09..1e+09 HU exceed int16 and are clipped to -32768..32767",
        "noise": "lowest value -128: no air (about -1000 HU) anywhere; is this CT in Hounsfield units?",
        "fine": "voxel spacing 0.1 x 0.1 x 0.1 mm (z y x) is outside the usual 0.2..10 mm of CT",
        "coarse": "voxel spacing 50 x 0.8 x 0.8 mm (z y x)",
    }
    for name, phrase in expected.items():
        line = f"{folder / name}.nii.gz: {phrase}"
        assert f"  WARNING {line}" in out and line in err  # in the summary, and logged as it happened
    assert "case0" not in out.split("\n", 1)[1]


def test_a_label_map_on_a_grid_of_another_size_fails_naming_the_label(tmp_path):
    image, label = ct_case(1)
    write_image(tmp_path / "img" / "a.nii.gz", image, GEOMETRY)
    write_image(tmp_path / "lab" / "a.nii.gz", label[:, :-2],
                dataclasses.replace(GEOMETRY, shape_zyx=(SHAPE[0], SHAPE[1] - 2, SHAPE[2])))
    write_cases(tmp_path / "img", [2], label_folder=tmp_path / "lab")
    summary = prepare([str(tmp_path / "img")], tmp_path / "store", label_dir=tmp_path / "lab")
    assert summary.prepared == ["case2"]  # the good case beside it lands
    [(_, reason)] = summary.failed
    label_path, image_path = tmp_path / "lab" / "a.nii.gz", tmp_path / "img" / "a.nii.gz"
    assert reason == (f"{label_path}: label grid does not match image {image_path}: "
                      "shape_zyx (12, 38, 48) vs the image's (12, 40, 48)")


def test_the_channel_is_part_of_a_cases_record_so_another_channel_is_prepared_again(tmp_path, capsys):
    volumes = np.stack([ct_case(1)[0], ct_case(2)[0]])  # (t, z, y, x): two different CTs
    fourd = sitk.GetImageFromArray(volumes, isVector=False)
    sitk.WriteImage(fourd, str(tmp_path / "fourd.nii.gz"))
    args = ["prepare", str(tmp_path / "fourd.nii.gz"), "--out", str(tmp_path / "store"), "--no-crop"]

    def stored():
        return Store.open(tmp_path / "store").image("fourd").read()

    assert cli_main([*args, "--channel", "0"]) == 0
    np.testing.assert_array_equal(stored(), volumes[0])
    assert cli_main([*args, "--channel", "1"]) == 0
    assert "1 prepared, 0 already done" in capsys.readouterr().out
    np.testing.assert_array_equal(stored(), volumes[1])
    assert cli_main([*args, "--channel", "1"]) == 0
    assert "0 prepared, 1 already done" in capsys.readouterr().out
    assert cli_main([*args, "--channel", "5"]) == 1
    assert f"FAILED {tmp_path / 'fourd.nii.gz'}: channel 5 out of range; the image has 2 volumes" in \
        capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated array", "deleted array", "damaged record"])
def test_preparing_again_redoes_a_damaged_case_and_training_names_one_it_cannot_read(tmp_path, damage, capsys):
    from tests.conftest import TINY_MODEL
    from volumefusion.data.phantoms import write_phantoms
    from volumefusion.data.store import Store

    files = write_phantoms(tmp_path / "raw", seeds=[1, 2], shape=(24, 48, 48), with_labels=False)
    store = tmp_path / "store"
    assert not prepare([str(f) for f in files], store, PrepareSettings()).failed
    case = Store.open(store).ids[0]
    image = store / "arrays" / case / "image.b2nd"
    whole = image.read_bytes()
    if damage == "truncated array":
        image.write_bytes(whole[: len(whole) // 2])
    elif damage == "deleted array":
        image.unlink()
    else:
        (store / "cases" / f"{case}.json").write_text('{"id": "cut sh')
    if damage == "truncated array":  # a run on the damaged store names the file in one line
        capsys.readouterr()  # what the in-process prepare above logged
        assert cli_main(["-q", "pretrain", "--data", str(store), "--out", str(tmp_path / "run"), "--workers", "1",
                         "--max-steps", "3", *[a for s in TINY_MODEL for a in ("--set", s)]]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{image}: the stored array cannot be read" in err, err
    summary = prepare([str(f) for f in files], store, PrepareSettings())
    assert summary.prepared == [case] and len(summary.skipped) == 1 and not summary.failed
    reopened = Store.open(store)
    assert reopened.verify(case) and image.read_bytes() == whole
