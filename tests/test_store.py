"""The prepared-data store: records, chunked arrays, crop reads, errors that point to `prepare`."""

from __future__ import annotations

import json
import pickle

import blosc2
import numpy as np
import pytest

from volumefusion import VolumeFusionError
from volumefusion.data.store import (
    BLOCKS,
    CHUNKS,
    Store,
    init_store,
    name_found_labels,
    safe_case_id,
    write_array,
    write_case,
)
from volumefusion.preprocess import PreparedCase

SETTINGS = {"spacing_zyx": None, "crop_to_body": True, "body_threshold": -600.0, "orientation": "LPS"}


def _case(shape=(40, 150, 140), seed=0, labelled=True) -> PreparedCase:
    rng = np.random.default_rng(seed)
    image = rng.integers(-1024, 2000, shape, dtype=np.int16)
    label = rng.integers(0, 3, shape, dtype=np.uint8) if labelled else None
    box = ((1, shape[0] - 1), (2, shape[1] - 2), (3, shape[2] - 3))
    return PreparedCase(image, label, (2.0, 0.8, 0.8), box, {"version": 1, "crop": [[0, s] for s in shape]})


@pytest.fixture
def store(tmp_path):
    init_store(tmp_path, SETTINGS, {0: "background", 1: "liver", 2: "spleen"})
    cases = {"b_case": _case(seed=1), "a_case": _case(seed=2, labelled=False, shape=(10, 20, 30))}
    for case_id, prepared in cases.items():
        label_source = None if prepared.label is None else f"/labels/{case_id}.nii.gz"
        write_case(tmp_path, prepared, case_id=case_id, source=f"/data/{case_id}.nii.gz",
                   label_source=label_source, settings=SETTINGS)
    return tmp_path, cases


def test_open_lists_finished_cases_sorted_with_their_records(store):
    path, cases = store
    s = Store.open(path)
    assert len(s) == 2 and s.ids == ["a_case", "b_case"]
    record = s.case("b_case")
    assert record.shape == (40, 150, 140) and record.spacing_zyx == (2.0, 0.8, 0.8)
    assert record.body_box == ((1, 39), (2, 148), (3, 137))
    assert record.label_classes == [1, 2] and s.case("a_case").label_classes == []
    assert record.source == "/data/b_case.nii.gz" and record.settings == SETTINGS
    assert s.label_names == {0: "background", 1: "liver", 2: "spleen"} and s.settings == SETTINGS


def test_crop_slicing_returns_the_stored_voxels(store):
    path, cases = store
    s = Store.open(path)
    image, label = s.image("b_case"), s.label("b_case")
    assert image.shape == (40, 150, 140) and image.dtype == np.int16 and label.dtype == np.uint8
    crop = image[5:37, 10:138, 3:131]
    assert type(crop) is np.ndarray
    np.testing.assert_array_equal(crop, cases["b_case"].image[5:37, 10:138, 3:131])
    np.testing.assert_array_equal(label[5:37, 10:138, 3:131], cases["b_case"].label[5:37, 10:138, 3:131])
    np.testing.assert_array_equal(s.image("a_case").read(), cases["a_case"].image)
    assert s.label("a_case") is None


def test_arrays_are_chunked_so_a_crop_touches_only_its_blocks(store):
    path, _ = store
    stored = blosc2.open(str(path / "arrays" / "b_case" / "image.b2nd"))
    assert stored.chunks == (32, 128, 128) == CHUNKS and stored.blocks == BLOCKS


def test_case_array_is_picklable_for_loader_workers(store):
    path, cases = store
    array = Store.open(path).image("b_case")
    array[0:1, 0:1, 0:1]  # opened in this process
    clone = pickle.loads(pickle.dumps(array))
    np.testing.assert_array_equal(clone[3:4, :, :], cases["b_case"].image[3:4])


def test_verify_detects_changed_arrays(store):
    path, cases = store
    assert Store.open(path).verify("b_case")
    changed = cases["b_case"].image.copy()
    changed[7, 7, 7] += 1
    write_array(path / "arrays" / "b_case" / "image.b2nd", changed)
    assert not Store.open(path).verify("b_case")


def test_rewriting_a_case_clears_leftovers_of_a_killed_writer(store):
    path, cases = store
    folder = path / "arrays" / "b_case"
    (folder / ".image.b2nd.abc123.tmp.b2nd").write_bytes(b"half")
    (path / "cases" / ".b_case.json.x1.tmp.json").write_text("{")
    assert Store.open(path).ids == ["a_case", "b_case"]  # temp record ignored
    write_case(path, cases["b_case"], case_id="b_case", source="s", label_source="l", settings=SETTINGS)
    assert sorted(p.name for p in folder.iterdir()) == ["image.b2nd", "label.b2nd"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such store folder"),
    (lambda p: p.mkdir(), "not a volumefusion store"),
    (lambda p: init_store(p, SETTINGS, None), "holds no prepared cases"),
])
def test_open_errors_say_to_run_prepare(tmp_path, setup, message):
    path = tmp_path / "store"
    setup(path)
    with pytest.raises(VolumeFusionError, match=message) as err:
        Store.open(path)
    assert "volumefusion prepare" in str(err.value)


def _raw_images(p):
    p.mkdir()
    (p / "ct_001.nii.gz").write_bytes(b"")


def _dataset(p):
    p.mkdir()
    (p / "dataset.json").write_text("{}")


@pytest.mark.parametrize("setup, data, hint", [
    (_raw_images, "raw", "raw holds raw images; prepare them into a new folder with `volumefusion prepare raw "
                         "--out STORE`"),
    (_dataset, "raw", "raw is a raw dataset (dataset.json); prepare it into a new folder with "
                      "`volumefusion prepare raw --out STORE` (finetune --data takes the dataset folder itself)"),
    (_dataset, "raw/dataset.json", "`volumefusion prepare raw --out STORE`"),
    (lambda p: p.mkdir(), "raw", "`volumefusion prepare INPUT... --out STORE` (a new folder)"),
])
def test_the_hint_for_a_folder_that_is_no_store_never_writes_into_it(tmp_path, monkeypatch, setup, data, hint):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path / "raw")
    with pytest.raises(VolumeFusionError) as err:
        Store.open(data)
    assert hint in str(err.value)
    assert f"--out {data}" not in str(err.value)


def test_name_found_labels_names_the_classes_of_labelled_cases(tmp_path):
    init_store(tmp_path, SETTINGS, None)
    write_case(tmp_path, _case(shape=(8, 8, 8), labelled=False), case_id="plain", source="/p", settings=SETTINGS)
    name_found_labels(tmp_path)
    assert json.loads((tmp_path / "store.json").read_text())["label_names"] is None  # nothing labelled
    write_case(tmp_path, _case(shape=(8, 8, 8)), case_id="lab", source="/s", label_source="/l", settings=SETTINGS)
    name_found_labels(tmp_path)
    assert Store.open(tmp_path).label_names == {0: "background", 1: "label_1", 2: "label_2"}
    init_store(tmp_path, SETTINGS, None)  # a later run without names keeps them


def test_a_case_record_written_last_defines_a_finished_case(store):
    path, _ = store
    (path / "cases" / "b_case.json").unlink()  # arrays exist, record missing: not a case
    assert Store.open(path).ids == ["a_case"]
    with pytest.raises(VolumeFusionError, match="no case 'b_case'"):
        Store.open(path).image("b_case")


def test_store_refuses_other_settings_or_labels(store):
    path, _ = store
    with pytest.raises(VolumeFusionError, match="prepared with settings"):
        init_store(path, {**SETTINGS, "crop_to_body": False}, None)
    with pytest.raises(VolumeFusionError, match="label names"):
        init_store(path, SETTINGS, {0: "background", 1: "kidney"})
    init_store(path, SETTINGS, None)  # same settings, no labels: fine


def test_store_json_from_a_newer_version_is_refused(store):
    path, _ = store
    meta = json.loads((path / "store.json").read_text())
    (path / "store.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(VolumeFusionError, match="newer"):
        Store.open(path)


@pytest.mark.parametrize("name, safe", [("liver_3", "liver_3"), ("a b/c", "a_b_c"), (".hidden", "hidden"),
                                         ("ü", "u"), ("Müller", "Muller"), ("", "case"),
                                         ("肝臓", "case_9816ce92"), ("肝臓_3", "3_bcdd7455")])
def test_safe_case_id(name, safe):
    assert safe_case_id(name) == safe
