"""Dataset discovery: which cases a list of inputs names, with unique case ids.

An input is an image file, a folder (searched recursively), a DICOM series folder, a glob, a
.txt/.csv list (see :func:`volumefusion.io.discover_inputs`), or an MSD / nnU-Net v2 raw dataset
folder (a folder holding ``dataset.json``: its training cases with their labels). ``prepare``,
``predict``, ``evaluate`` and the demo name cases alike through this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from volumefusion import VolumeFusionError
from volumefusion.data.store import safe_case_id
from volumefusion.io import SERIES_SEPARATOR, case_id_from_path, discover_inputs, resolved


@dataclass
class CaseTask:
    """One case to prepare: where its image (and label) come from. Picklable for worker processes."""

    case_id: str
    image: str
    label: str | None = None
    channel: int | None = None
    allowed_labels: list[int] | None = None
    """label values the dataset declares (dataset.json); None accepts any 0..255."""



def absolute_source(path: str | Path) -> str:
    """``path`` made absolute; a DICOM ``folder::SERIES_UID`` keeps its series suffix."""
    text = str(path)
    if SERIES_SEPARATOR in text:
        folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
        return f"{resolved(folder)}{SERIES_SEPARATOR}{uid}"
    return str(resolved(text))


def read_dataset_description(path: Path) -> tuple[dict, dict[int, str]]:
    """The parsed ``dataset.json`` of an MSD or nnU-Net v2 dataset and its ``{value: name}`` labels
    (background included), from MSD (``"1": "liver"``) or nnU-Net v2 (``"liver": 1``) form."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VolumeFusionError(f"{path}: unreadable dataset description ({exc})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise VolumeFusionError(f"{path}: no 'labels' mapping")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):
            names[value] = key
        elif isinstance(value, str) and key.strip().isdigit():
            names[int(key)] = value
        else:
            raise VolumeFusionError(
                f"{path}: label {key!r}: {value!r} is neither MSD ('1': 'liver') nor nnU-Net v2 "
                "('liver': 1); region-based labels are not supported"
            )
    return meta, dict(sorted(names.items()))


def _dataset_cases(folder: Path, channel: int | None) -> tuple[list[CaseTask], dict[int, str]]:
    """Cases and label names of an MSD or nnU-Net v2 raw dataset folder (``dataset.json``)."""
    meta_path = folder / "dataset.json"
    meta, names = read_dataset_description(meta_path)
    allowed = sorted(names)
    if "training" in meta:  # MSD: explicit image/label pairs; multi-modal images are 4D
        tasks = [
            CaseTask(case_id_from_path(e["image"]), str(folder / e["image"]), str(folder / e["label"]),
                     channel, allowed)
            for e in meta["training"]
        ]
    else:  # nnU-Net v2: imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz
        ending = meta.get("file_ending", ".nii.gz")
        channels = meta.get("channel_names") or {"0": "CT"}
        if channel is None and len(channels) > 1:
            raise VolumeFusionError(
                f"{meta_path}: {len(channels)} channels {channels}; choose one with --channel k"
            )
        suffix = f"_{channel or 0:04d}{ending}"
        images = sorted(p for p in (folder / "imagesTr").glob(f"*{suffix}") if not p.name.startswith("."))
        if not images:
            raise VolumeFusionError(f"{folder / 'imagesTr'}: no images named CASE{suffix}")
        tasks = []
        for image in images:
            case = image.name[: -len(suffix)]
            label = folder / "labelsTr" / f"{case}{ending}"
            tasks.append(CaseTask(case, str(image), str(label), None, allowed))
    return tasks, names


def _label_index(label_dir: Path) -> dict[str, Path]:
    return {safe_case_id(case_id_from_path(p)): p for p in discover_inputs([label_dir])}


def unique_case_ids(tasks: list[CaseTask], failures: list[tuple[str, str]]) -> list[CaseTask]:
    """Make case ids unique (``prepare`` and ``predict`` name cases alike): ids become safe file names,
    names shared by several files get their folder path as a prefix; files that still collide
    (``a.nii`` next to ``a.nii.gz``) are reported in ``failures`` and dropped."""
    groups: dict[str, list[CaseTask]] = {}
    for task in tasks:
        task.case_id = safe_case_id(task.case_id)
        groups.setdefault(task.case_id, []).append(task)
    result = []
    for case_id, group in groups.items():
        if len(group) > 1:
            folders = [Path(absolute_source(t.image).split(SERIES_SEPARATOR)[0]).parent for t in group]
            common = Path(os.path.commonpath(folders))
            for task, f in zip(group, folders):
                task.case_id = safe_case_id("_".join(f.relative_to(common).parts + (case_id,)))
        result.extend(group)
    counts: dict[str, list[str]] = {}
    for task in result:
        counts.setdefault(task.case_id, []).append(task.image)
    kept = []
    for task in result:
        others = [p for p in counts[task.case_id] if p != task.image]
        if others:
            failures.append((task.image, f"{task.image}: duplicate case id {task.case_id!r}, also given by "
                                         f"{', '.join(others)}; rename one of them"))
        else:
            kept.append(task)
    return kept


def collect_cases(
    inputs: list[str], *, channel: int | None = None, label_dir: str | Path | None = None
) -> tuple[list[CaseTask], dict[int, str] | None, list[tuple[str, str]]]:
    """Expand ``inputs`` into case tasks with unique ids.

    A folder holding ``dataset.json`` is an MSD / nnU-Net raw dataset (its training cases with
    labels); anything else goes through :func:`volumefusion.io.discover_inputs`, with labels
    looked up by case id in ``label_dir``. Returns ``(tasks, label_names, failures)``.
    """
    failures: list[tuple[str, str]] = []
    tasks: list[CaseTask] = []
    label_names: dict[int, str] | None = None
    plain: list[str] = []
    for item in inputs:
        folder = Path(item)
        if folder.is_dir() and (folder / "dataset.json").is_file():
            dataset_tasks, names = _dataset_cases(folder, channel)
            if label_names is not None and names != label_names:
                raise VolumeFusionError(
                    f"{folder}: label names {names} differ from another dataset's {label_names}; "
                    "prepare them into separate stores"
                )
            label_names = names
            tasks += dataset_tasks
        else:
            plain.append(item)
    labels = _label_index(Path(label_dir)) if label_dir is not None and plain else {}
    for image in discover_inputs(plain, errors=failures) if plain else []:
        case_id = case_id_from_path(image)
        task = CaseTask(case_id, str(image), None, channel)
        if label_dir is not None:
            key = safe_case_id(case_id)
            # nnU-Net names channel files CASE_0000; their label is CASE
            bare = key[:-5] if len(key) > 5 and key[-5] == "_" and key[-4:].isdigit() else key
            match = labels.get(key) or labels.get(bare)
            if match is None:
                failures.append((str(image), f"{image}: no label file for case {case_id!r} in {label_dir}"))
                continue
            task.label = str(match)
        tasks.append(task)
    return unique_case_ids(tasks, failures), label_names, failures
