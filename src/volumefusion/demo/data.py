"""The demo's data: procedural phantoms (plus the slicerio chest CT), written and prepared once.

Every phantom is a fixed function of its seed (:mod:`volumefusion.data.phantoms`); the seeds of each
role start at :data:`~volumefusion.demo.settings.SEED_BASE`, so no phantom has two roles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError
from volumefusion.data.datasets import read_dataset_description
from volumefusion.data.phantoms import write_msd_dataset, write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.data.samples import chest_ct
from volumefusion.demo.settings import SEED_BASE, DemoSettings
from volumefusion.io import atomic_write_text, read_image, write_image
from volumefusion.log import get_logger
from volumefusion.preprocess import PrepareSettings

log = get_logger(__name__)


@dataclass
class DemoData:
    """Where :func:`make_data` put things.

    ``splits[n]``: the split file of the regime with ``n`` labelled training phantoms (the first ``n``
    of the dataset's training phantoms; the same validation phantoms for every regime).
    """

    pool_store: Path
    pool_inputs: list[str]
    dataset: Path
    splits: dict[int, Path]
    test_images: Path
    test_labels: Path
    label_names: dict[int, str]
    chest_ct: bool


def phantom_seeds(settings: DemoSettings, role: str) -> list[int]:
    """The seeds of the phantoms of ``role`` (pool, train, val or test)."""
    return [SEED_BASE[role] + i for i in range(getattr(settings.phantoms, role))]


def make_data(settings: DemoSettings, root: Path) -> DemoData:
    """Write the phantoms under ``root``, prepare the unlabelled pool and write one split per regime."""
    p = settings.phantoms
    geometry = {"shape": tuple(p.shape), "spacing_zyx": tuple(p.spacing_zyx)}
    inputs = []
    if p.pool:
        write_phantoms(root / "pool", phantom_seeds(settings, "pool"), with_labels=False, **geometry)
        inputs.append(str(root / "pool" / "images"))
    with_ct = False
    if p.chest_ct:
        try:
            inputs.append(str(chest_ct()[0]))
            with_ct = True
        except VolumeFusionError as exc:
            log.info("pool without the real chest CT (%s)", exc)
    # The chest CT is resampled onto the phantoms' grid, so one crop covers a whole torso in both.
    summary = prepare(inputs, root / "pool_store", PrepareSettings(spacing_zyx=tuple(p.spacing_zyx)))
    if summary.failed:
        raise VolumeFusionError("preparing the demo pool failed: " + "; ".join(r for _, r in summary.failed))

    train, val = phantom_seeds(settings, "train"), phantom_seeds(settings, "val")
    dataset = write_msd_dataset(root / "Task01_Phantom", train + val, **geometry)
    entries = json.loads((dataset / "dataset.json").read_text())["training"]
    ids = [Path(e["image"]).name.removesuffix(".nii.gz") for e in entries]
    splits = {}
    for n in settings.protocol.labelled:
        splits[n] = root / f"split_{n}labelled.json"
        atomic_write_text(splits[n], json.dumps({"train": ids[:n], "val": ids[len(train):]}, indent=1) + "\n")
    test = write_phantoms(root / "test", phantom_seeds(settings, "test"), with_labels=True, **geometry)
    names = merge_paired_organs(dataset, [dataset / "labelsTr", root / "test" / "labels"])
    return DemoData(root / "pool_store", inputs, dataset, splits, test[0].parent, root / "test" / "labels",
                    names, with_ct)


def paired_organs_merged(names: dict[int, str]) -> tuple[dict[int, str], np.ndarray]:
    """Label names with each ``X_right``/``X_left`` pair merged into one class ``X``, and the uint8
    lookup table old value -> new value (new values numbered in order of first appearance)."""
    merged: dict[str, int] = {}
    table = np.zeros(max(names) + 1, dtype=np.uint8)
    for value, name in sorted(names.items()):
        base = name.removesuffix("_right").removesuffix("_left")
        table[value] = merged.setdefault(base, len(merged))
    return {v: k for k, v in merged.items()}, table


def merge_paired_organs(dataset: Path, label_dirs: list[Path]) -> dict[int, str]:
    """Rewrite the label maps in ``label_dirs`` and ``dataset/dataset.json`` with left/right organs
    merged; returns the new label names.

    The report scores organs: a kidney is a kidney on either side, and one class of two small
    blobs gives a steadier Dice than two classes of one (the earlier demo also mirrored left and
    right in augmentation, which made the sides ambiguous; see docs/method.md).
    """
    meta, labels = read_dataset_description(dataset / "dataset.json")
    names, table = paired_organs_merged(labels)
    for folder in label_dirs:
        for path in sorted(folder.glob("*.nii.gz")):
            label, geometry = read_image(path)
            write_image(path, table[label], geometry)
    meta["labels"] = {str(k): v for k, v in names.items()}
    atomic_write_text(dataset / "dataset.json", json.dumps(meta, indent=1) + "\n")
    return names
