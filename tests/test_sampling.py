"""Crop loaders: deterministic and resumable streams, per-rank samples, worker-independent order,
no self-fusion, crops inside the body box, padding, foreground oversampling and clear errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from volumefusion import VolumeFusionError
from volumefusion.data.index import CaseIndex
from volumefusion.data.phantoms import make_phantom, write_msd_dataset, write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.data.sampling import PretrainLoader, SegmentationLoader
from volumefusion.data.store import Store
from volumefusion.io import Geometry, write_image
from volumefusion.preprocess import PrepareSettings

CROP = (8, 16, 16)
# keep the body box smaller than the array, so "inside the body box" is a real constraint
SETTINGS = PrepareSettings(crop_to_body=False)


def _store(root, inputs) -> Store:
    summary = prepare([str(p) for p in inputs], root, SETTINGS)
    assert not summary.failed
    return Store.open(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Three unlabelled [24, 48, 48] phantoms."""
    root = tmp_path_factory.mktemp("sampling")
    return _store(root / "store", write_phantoms(root / "raw", seeds=[1, 2, 3], shape=(24, 48, 48)))


@pytest.fixture(scope="module")
def two_case_store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("two")
    return _store(root / "store", write_phantoms(root / "raw", seeds=[4, 5], shape=(24, 48, 48)))


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("labelled")
    return _store(root / "store", [write_msd_dataset(root / "msd", seeds=[6, 7, 8], shape=(24, 48, 48))])


@pytest.fixture(scope="module")
def spot_store(tmp_path_factory) -> Store:
    """One labelled case whose only foreground is a 2x2x2 cube: uniform crops rarely contain it."""
    root = tmp_path_factory.mktemp("spot")
    shape = (24, 64, 64)
    image = make_phantom(9, shape=shape).image
    label = np.zeros(shape, np.uint8)
    label[11:13, 30:32, 40:42] = 1
    geometry = Geometry(shape, (2.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    write_image(root / "msd" / "imagesTr" / "spot.nii.gz", image, geometry)
    write_image(root / "msd" / "labelsTr" / "spot.nii.gz", label, geometry)
    meta = {"labels": {"0": "background", "1": "spot"},
            "training": [{"image": "./imagesTr/spot.nii.gz", "label": "./labelsTr/spot.nii.gz"}]}
    (root / "msd" / "dataset.json").write_text(json.dumps(meta))
    return _store(root / "store", [root / "msd"])


def _take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    def same(u, v):
        return torch.equal(u, v) if torch.is_tensor(u) else u == v

    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(same(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _locate(volume: np.ndarray, crop: np.ndarray) -> list[tuple[int, int, int]]:
    """Every position where ``crop`` occurs inside ``volume``."""
    windows = sliding_window_view(volume, crop.shape)
    candidates = np.argwhere(windows[..., 0, 0, 0] == crop[0, 0, 0])  # noisy CT: few candidates
    return [tuple(int(v) for v in p) for p in candidates if np.array_equal(windows[tuple(p)], crop)]


# --------------------------------------------------------------------------------------------------
# Pretraining loader


def test_pretrain_batch_has_documented_layout(store):
    batch = next(iter(PretrainLoader(store, CROP, 3, seed=0)))
    for key in ("background", "foreground"):
        assert batch[key].shape == (3, 1, *CROP) and batch[key].dtype == torch.int16
    assert len(batch["case_ids"]) == 3 and batch["step"] == 0
    assert batch["background"].float().std() > 10  # real CT content, not padding


def test_same_seed_gives_the_same_stream_and_another_seed_does_not(store):
    a = _take(PretrainLoader(store, CROP, 2, seed=5), 3)
    assert _same_batches(a, _take(PretrainLoader(store, CROP, 2, seed=5), 3))
    assert not _same_batches(a, _take(PretrainLoader(store, CROP, 2, seed=6), 3))


def test_resume_continues_the_continuous_stream(store):
    continuous = _take(PretrainLoader(store, CROP, 2, seed=1), 6)
    resumed = _take(PretrainLoader(store, CROP, 2, seed=1, start_step=4), 2)
    assert [b["step"] for b in resumed] == [4, 5]
    assert _same_batches(continuous[4:], resumed)


def test_ranks_draw_different_crops(store):
    rank0 = _take(PretrainLoader(store, CROP, 2, seed=1, rank=0, world_size=2), 3)
    rank1 = _take(PretrainLoader(store, CROP, 2, seed=1, rank=1, world_size=2), 3)
    for a, b in zip(rank0, rank1):
        assert not torch.equal(a["background"], b["background"])


def test_worker_processes_give_the_same_stream_as_the_main_process(store):
    main = _take(PretrainLoader(store, CROP, 2, seed=3, workers=0), 7)
    # resuming at an odd step with two workers must still keep the order
    workers = _take(PretrainLoader(store, CROP, 2, seed=3, workers=2, start_step=3), 4)
    assert _same_batches(main[3:], workers)


def test_loading_leaves_the_global_rng_alone(store):
    # the engine's exact resume restores the global RNG (dropout); the loader must not draw from it
    state = torch.get_rng_state()
    next(iter(PretrainLoader(store, CROP, 2, seed=0)))
    assert torch.equal(state, torch.get_rng_state())


def test_batch_size_one_never_fuses_a_case_with_itself(two_case_store):
    pairs = [b["case_ids"][0] for b in _take(PretrainLoader(two_case_store, CROP, 1, seed=0), 200)]
    assert all(bg != fg for bg, fg in pairs)
    backgrounds = [bg for bg, _ in pairs]
    assert 60 < backgrounds.count("phantom_0004") < 140  # cases drawn uniformly


def test_grid_mode_takes_both_crops_from_one_case(store):
    batches = _take(PretrainLoader(store, CROP, 4, seed=0, same_case=True), 5)
    assert all(bg == fg for b in batches for bg, fg in b["case_ids"])
    assert any(not torch.equal(b["background"], b["foreground"]) for b in batches)


def test_crops_lie_inside_the_body_box(store):
    images = {i: store.image(i).read() for i in store.ids}
    records = {i: store.info(i) for i in store.ids}
    starts = []
    for batch in _take(PretrainLoader(store, CROP, 4, seed=2), 5):
        for i, (bg, fg) in enumerate(batch["case_ids"]):
            for key, case in (("background", bg), ("foreground", fg)):
                found = _locate(images[case], batch[key][i, 0].numpy())
                assert len(found) == 1
                box = records[case].body_box
                # every axis of these cases' body boxes is at least as long as the crop
                assert all(lo <= s and s + c <= hi for s, c, (lo, hi) in zip(found[0], CROP, box))
                starts.append(found[0])
    assert len(set(starts)) > len(starts) // 2  # positions vary


def test_small_case_is_padded_and_fully_contained(tmp_path):
    store = _store(tmp_path / "store", write_phantoms(tmp_path / "raw", seeds=[1], shape=(6, 12, 12)))
    case = store.image(store.ids[0]).read()
    for batch in _take(PretrainLoader(store, CROP, 2, seed=0, pad_value=-3000), 3):
        for crop in batch["background"][:, 0].numpy():
            found = _locate(crop, case)  # the whole case sits inside the crop ...
            assert len(found) == 1
            z, y, x = found[0]
            outside = np.ones(CROP, bool)
            outside[z:z + 6, y:y + 12, x:x + 12] = False
            assert (crop[outside] == -3000).all()  # ... and the rest is padding
    with pytest.raises(VolumeFusionError, match="larger than every case"):
        PretrainLoader(store, CROP, 2, seed=0, allow_padding=False)


def test_empty_store_is_an_error(store):
    with pytest.raises(VolumeFusionError, match="no cases"):
        PretrainLoader(Store(store.path, store.meta, CaseIndex(store.index.rows[:0], None)), CROP, 2, seed=0)


# --------------------------------------------------------------------------------------------------
# Segmentation loader


def test_segmentation_crops_are_aligned_image_and_label(labelled_store):
    ids = labelled_store.ids
    batches = _take(SegmentationLoader(labelled_store, ids, CROP, 3, seed=0), 3)
    for batch in batches:
        assert batch["image"].dtype == torch.int16 and batch["label"].dtype == torch.uint8
        assert batch["image"].shape == batch["label"].shape == (3, 1, *CROP)
        for i, case in enumerate(batch["case_ids"]):
            found = _locate(labelled_store.image(case).read(), batch["image"][i, 0].numpy())
            z, y, x = found[0]
            label = labelled_store.label(case).read()[z:z + CROP[0], y:y + CROP[1], x:x + CROP[2]]
            assert np.array_equal(batch["label"][i, 0].numpy(), label)


def test_segmentation_stream_is_resumable_across_workers(labelled_store):
    ids = labelled_store.ids
    main = _take(SegmentationLoader(labelled_store, ids, CROP, 2, seed=4, foreground_ratio=0.5), 5)
    workers = _take(SegmentationLoader(labelled_store, ids, CROP, 2, seed=4, foreground_ratio=0.5, workers=2,
                                       start_step=1), 4)
    assert _same_batches(main[1:], workers)


def _foreground_share(store: Store, ratio: float, steps: int = 75) -> float:
    loader = SegmentationLoader(store, store.ids[:1], CROP, 4, seed=0, foreground_ratio=ratio)
    hits = [bool(crop.any()) for b in _take(loader, steps) for crop in b["label"]]
    return float(np.mean(hits))


def test_foreground_oversampling_share_follows_the_ratio(spot_store):
    baseline = _foreground_share(spot_store, 0.0)  # uniform crops that happen to contain the spot
    assert baseline < 0.2
    assert _foreground_share(spot_store, 1.0) == 1.0
    expected = 0.33 + 0.67 * baseline
    assert abs(_foreground_share(spot_store, 0.33) - expected) < 0.08


def test_segmentation_errors_name_the_problem(store, labelled_store):
    with pytest.raises(VolumeFusionError, match="no label"):
        SegmentationLoader(store, store.ids[:1], CROP, 2, seed=0)
    with pytest.raises(VolumeFusionError, match="no case 'nope' in the store"):
        SegmentationLoader(labelled_store, ["nope"], CROP, 2, seed=0)
    with pytest.raises(VolumeFusionError, match="2 requested cases are not in the store"):
        SegmentationLoader(labelled_store, ["nope", "nix"], CROP, 2, seed=0)
    with pytest.raises(VolumeFusionError, match="foreground_ratio"):
        SegmentationLoader(labelled_store, labelled_store.ids[:1], CROP, 2, seed=0,
                           foreground_ratio=1.5)
