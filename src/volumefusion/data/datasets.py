"""Dataset discovery: which images and cases a list of inputs names, with unique case ids.

An input is an image file, a folder (searched recursively), a DICOM series folder, a glob, a
.txt/.csv list (:func:`discover_inputs`), or an MSD / nnU-Net v2 raw dataset folder (a folder holding
``dataset.json``: its training cases with their labels, :func:`collect_cases`). ``prepare``,
``predict``, ``evaluate``, ``show`` and the demo find and name cases alike through this module.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from volumefusion import VolumeFusionError
from volumefusion.data.store import safe_case_id
from volumefusion.files import missing_reason, resolved
from volumefusion.io import IMAGE_SUFFIXES, SERIES_SEPARATOR, is_image_file, split_series

LIST_SUFFIXES = (".csv", ".txt")


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


# --------------------------------------------------------------------------------------------------
# images named by inputs


def _is_dicom_file(path: Path) -> bool:
    """By extension, else by the DICM magic (exports often name slices by UID: ``1.2.840....7``)."""
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dataset_images(folder: Path) -> str:
    """The folder of images to segment in an MSD / nnU-Net dataset: ``imagesTs``, else ``imagesTr``."""
    for name in ("imagesTs", "imagesTr"):
        if (folder / name).is_dir() and any(not n.startswith(".") for n in os.listdir(folder / name)):
            return name
    raise VolumeFusionError(f"{folder}: dataset folder (dataset.json) with no images in imagesTs/ or imagesTr/")


def _search_folder(folder: Path) -> list[Path]:
    """Image files and DICOM series folders under ``folder`` (hidden entries skipped); of a dataset
    folder (``dataset.json``), only the images of :func:`_dataset_images`, never its labels."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        if "dataset.json" in files:
            dirs[:], files = [_dataset_images(root_path)], []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        visible = [f for f in files if not f.startswith(".")]
        found.extend(root_path / f for f in visible if is_image_file(f))
        if any(_is_dicom_file(root_path / f) for f in visible if not is_image_file(f)):
            found.append(root_path)
    return found


def _read_list(path: Path) -> list[Path]:
    """Paths listed one per line (.txt) or in the first / ``image`` / ``path`` column (.csv)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and r[0].strip()]
        header = [c.strip().lower() for c in rows[0]] if rows else []
        column = next((header.index(n) for n in ("image", "path", "file") if n in header), None)
        if column is not None:
            rows = rows[1:]
        entries = [r[column or 0].strip() for r in rows if len(r) > (column or 0)]
    else:
        entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def _discover_one(item: str | Path) -> list[Path]:
    """Expand one input (file, folder, glob, ``folder::UID``) into images; VolumeFusionError if none."""
    text = str(item)
    if SERIES_SEPARATOR in text:
        folder, _ = split_series(text)
        if not folder.is_dir():
            raise VolumeFusionError(f"{folder}: DICOM folder not found")
        return [Path(text)]
    path = Path(text)
    if path.is_dir():
        found = _search_folder(path)
        if not found:
            raise VolumeFusionError(f"{path}: folder holds no NIfTI/NRRD/MHA images or DICOM series")
        return found
    if path.is_file():
        return [path]
    if glob.has_magic(text):
        matches = sorted(glob.glob(text, recursive=True))
        found = [p for m in matches for p in (_search_folder(Path(m)) if Path(m).is_dir() else [Path(m)])]
        found = [p for p in found if p.is_dir() or is_image_file(p)]
        if not found:
            raise VolumeFusionError(f"{text}: pattern matches no images")
        return found
    raise VolumeFusionError(f"{text}: {missing_reason(text)}")


def discover_inputs(inputs: list[str | Path], errors: list[tuple[str, str]] | None = None) -> list[Path]:
    """Images named by ``inputs``, deduplicated, in sorted order.

    Each input may be an image file, a folder (searched recursively for NIfTI/NRRD/MHA files and
    DICOM series folders), a glob pattern, or a ``.csv``/``.txt`` list whose entries may be any of
    these (relative paths are relative to the list). An input or list entry that matches nothing
    raises VolumeFusionError, or, when ``errors`` is given, is appended to it as ``(input, reason)``
    and skipped, so one missing file does not stop a batch.

    An MSD / nnU-Net dataset folder (one holding ``dataset.json``), given or found while searching,
    contributes only the images to segment: ``imagesTs/``, or ``imagesTr/`` when ``imagesTs/`` is
    missing or empty; never the ``labelsTr/`` label maps. (``prepare`` given a dataset folder itself
    takes its labelled training cases instead.)
    """
    found: set[Path] = set()

    def fail(item, exc: VolumeFusionError) -> None:
        if errors is None:
            raise exc
        errors.append((str(item), str(exc)))

    def add(item) -> None:
        try:
            found.update(_discover_one(item))
        except VolumeFusionError as exc:
            fail(item, exc)

    for item in inputs:
        path = Path(item)
        if path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
            entries = _read_list(path)
            if not entries:
                fail(path, VolumeFusionError(f"{path}: the list is empty"))
            for entry in entries:
                add(entry)
        else:
            add(item)
    return sorted(found, key=str)


def case_id_from_path(path: str | Path) -> str:
    """A case name from a path: the file name without image suffixes; a DICOM folder's name.

    ``ct/liver_3.nii.gz`` -> ``liver_3``; ``dicom/patient7/`` -> ``patient7``; a picked series
    ``dicom/patient7::1.2.3`` -> ``patient7_<8 hex digits of the UID's hash>``.
    """
    folder, uid = split_series(path)
    if uid is not None:
        return f"{folder.name}_{hashlib.sha1(uid.encode()).hexdigest()[:8]}"
    name = folder.name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------------
# datasets and case ids


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
    seen: dict[str, int] = {}
    for value, name in sorted(names.items()):
        if name in seen:  # evaluation by name would merge the two classes
            raise VolumeFusionError(f"{path}: labels {seen[name]} and {value} are both named {name!r}; give each "
                                    "class its own name")
        seen[name] = value
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
    labels); anything else goes through :func:`discover_inputs`, with labels
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
