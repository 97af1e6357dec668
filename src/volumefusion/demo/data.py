"""The demo's data: procedural phantoms (plus the slicerio chest CT), written and prepared once.

Every phantom is a fixed function of its seed (:mod:`volumefusion.data.phantoms`); the seeds of each
role start at :data:`~volumefusion.demo.settings.SEED_BASE`, so no phantom has two roles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError
from volumefusion.data.datasets import read_dataset_description
from volumefusion.data.phantoms import write_msd_dataset, write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.data.samples import chest_ct
from volumefusion.demo.settings import SEED_BASE, DemoSettings
from volumefusion.files import atomic_write_text
from volumefusion.io import read_image, write_image
from volumefusion.log import get_logger
from volumefusion.preprocess import PrepareSettings

log = get_logger(__name__)


@dataclass
class DemoData:
    """Where :func:`make_data` put things (paths under the demo's ``data/`` folder).

    ``splits[f"{n}/{seed}"]``: the split file of the run with ``n`` labelled training phantoms and
    ``seed``: which ``n`` of the training phantoms are labelled depends on the seed (all of them in the
    full regime); every split validates on the same validation phantoms.
    """

    pool_store: Path | None
    gate_store: Path
    dataset: Path
    splits: dict[str, Path]
    control_dataset: Path
    control_split: Path
    test_images: Path
    test_labels: Path
    label_names: dict[int, str]
    chest_ct: bool

    def split(self, labelled: int, seed: int) -> Path:
        return self.splits[f"{labelled}/{seed}"]

    def to_dict(self, root: Path) -> dict:
        """Plain data, paths relative to ``root`` (so a moved demo folder still reads)."""
        def rel(path: Path | None) -> str | None:
            return None if path is None else str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        out = {k: rel(v) if isinstance(v, Path) or v is None else v for k, v in asdict(self).items()}
        out["splits"] = {k: rel(v) for k, v in self.splits.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict, root: Path) -> DemoData:
        def path(value: str | None) -> Path | None:
            return None if value is None else root / value
        fields = {k: path(v) if k not in ("label_names", "chest_ct", "splits") else v for k, v in d.items()}
        fields["splits"] = {k: path(v) for k, v in d["splits"].items()}
        fields["label_names"] = {int(k): v for k, v in d["label_names"].items()}
        return cls(**fields)


def phantom_seeds(settings: DemoSettings, role: str) -> list[int]:
    """The seeds of the phantoms of ``role`` (pool, train, val, test, control or gate)."""
    first = SEED_BASE[role] + settings.phantoms.seed_offset
    return [first + i for i in range(getattr(settings.phantoms, role))]


def labelled_ids(ids: list[str], labelled: int, seed: int) -> list[str]:
    """The ``labelled`` training cases of the run with ``seed``: a seeded choice among ``ids``."""
    order = np.random.default_rng([seed, labelled]).permutation(len(ids))
    return sorted(ids[i] for i in order[:labelled])


def make_data(settings: DemoSettings, root: Path, with_pool: bool) -> DemoData:
    """Write the phantoms under ``root`` and prepare the unlabelled stores: the live pretraining's pool
    (``with_pool``) and the gate's unseen phantoms; write one split file per regime and seed.

    A finished call leaves ``root/data.json``; later calls (a resumed demo) read it and write nothing.
    """
    done = root / "data.json"
    if done.is_file():
        return DemoData.from_dict(json.loads(done.read_text()), root)
    p = settings.phantoms
    geometry = {"shape": tuple(p.shape), "spacing_zyx": tuple(p.spacing_zyx), "vary": p.vary}
    # every store is resampled onto the phantoms' grid, as the built-in weights' pool was
    prep = PrepareSettings(spacing_zyx=tuple(p.spacing_zyx))
    pool_store, with_ct = None, False
    if with_pool:
        inputs = []
        if p.pool:
            write_phantoms(root / "pool", phantom_seeds(settings, "pool"), **geometry)
            inputs.append(str(root / "pool" / "images"))
        if p.chest_ct:
            try:
                inputs.append(str(chest_ct()[0]))
                with_ct = True
            except VolumeFusionError as exc:
                log.info("pool without the real chest CT (%s)", exc)
        pool_store = _prepare(inputs, root / "pool_store", prep)
    write_phantoms(root / "gate", phantom_seeds(settings, "gate"), **geometry)
    gate_store = _prepare([str(root / "gate" / "images")], root / "gate_store", prep)

    train, val = phantom_seeds(settings, "train"), phantom_seeds(settings, "val")
    dataset = write_msd_dataset(root / "Task01_Phantom", train + val, **geometry)
    ids = _case_ids(dataset)
    train_ids, val_ids = ids[:len(train)], ids[len(train):]
    splits = {}
    for n in settings.protocol.labelled:
        for seed in settings.protocol.seeds:
            splits[f"{n}/{seed}"] = _write_split(root / "splits" / f"{n}labelled_seed{seed}.json",
                                                 labelled_ids(train_ids, n, seed), val_ids)
    control = write_msd_dataset(root / "Task02_PhantomControl", phantom_seeds(settings, "control"), **geometry)
    control_ids = _case_ids(control)
    control_split = _write_split(root / "splits" / "control.json", control_ids[:-1], control_ids[-1:])
    test = write_phantoms(root / "test", phantom_seeds(settings, "test"), with_labels=True, **geometry)
    names = merge_paired_organs([dataset, control], [root / "test" / "labels"])
    data = DemoData(pool_store, gate_store, dataset, splits, control, control_split, test[0].parent,
                    root / "test" / "labels", names, with_ct)
    atomic_write_text(done, json.dumps(data.to_dict(root), indent=1) + "\n")
    return data


def _prepare(inputs: list[str], store: Path, settings: PrepareSettings) -> Path:
    summary = prepare(inputs, store, settings)
    if summary.failed:
        raise VolumeFusionError(f"preparing the demo's {store.name} failed: "
                                + "; ".join(r for _, r in summary.failed))
    return store


def _case_ids(dataset: Path) -> list[str]:
    entries = json.loads((dataset / "dataset.json").read_text())["training"]
    return [Path(e["image"]).name.removesuffix(".nii.gz") for e in entries]


def _write_split(path: Path, train: list[str], val: list[str]) -> Path:
    atomic_write_text(path, json.dumps({"train": train, "val": val}, indent=1) + "\n")
    return path


def paired_organs_merged(names: dict[int, str]) -> tuple[dict[int, str], np.ndarray]:
    """Label names with each ``X_right``/``X_left`` pair merged into one class ``X``, and the uint8
    lookup table old value -> new value (new values numbered in order of first appearance)."""
    merged: dict[str, int] = {}
    table = np.zeros(max(names) + 1, dtype=np.uint8)
    for value, name in sorted(names.items()):
        base = name.removesuffix("_right").removesuffix("_left")
        table[value] = merged.setdefault(base, len(merged))
    return {v: k for k, v in merged.items()}, table


def merge_paired_organs(datasets: list[Path], label_dirs: list[Path]) -> dict[int, str]:
    """Rewrite the label maps of ``datasets`` (their ``labelsTr/`` and ``dataset.json``) and of
    ``label_dirs`` with left/right organs merged; returns the new label names.

    The report scores organs: a kidney is a kidney on either side, and one class of two small
    blobs gives a steadier Dice than two classes of one (the earlier demo also mirrored left and
    right in augmentation, which made the sides ambiguous; see docs/method.md).
    """
    folders = list(label_dirs)
    for dataset in datasets:  # phantom datasets: one set of label names
        meta, labels = read_dataset_description(dataset / "dataset.json")
        names, table = paired_organs_merged(labels)
        meta["labels"] = {str(k): v for k, v in names.items()}
        atomic_write_text(dataset / "dataset.json", json.dumps(meta, indent=1) + "\n")
        folders.append(dataset / "labelsTr")
    for folder in folders:
        for path in sorted(folder.glob("*.nii.gz")):
            label, geometry = read_image(path)
            write_image(path, table[label], geometry)
    return names
