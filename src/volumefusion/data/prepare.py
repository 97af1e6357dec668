"""Raw CT -> store: reorient, optionally resample, crop to the body, int16 HU; and the way back.

Per case (:func:`preprocess_case`):

1. **Reorient** to one canonical orientation by axis permutation and flips only (no interpolation).
   The default ``"LPS"`` (DICOM letters: the direction each index axis x, y, z points to) gives arrays
   ``(z, y, x)`` whose z runs inferior -> superior, y anterior -> posterior, x right -> left: every
   axial slice ``array[z]`` looks like a radiological display. Oblique scans keep their residual
   rotation in the direction matrix (as ``SimpleITK.DICOMOrient`` does).
2. **Resample** to ``spacing_zyx`` if given (images linear, labels nearest); default keeps the
   native spacing, as the reference does. The first voxel's centre stays where it was.
3. **Body box**: HU > ``body_threshold``, largest connected component, its bounding box; the whole
   volume if nothing passes. With ``crop_to_body`` the arrays are cropped to it (grown to keep every
   labelled voxel).
4. HU rounded and clipped to int16; labels uint8.

``restore`` (a JSON-serialisable dict) records each step, and :func:`restore_to_original` maps any
prepared-space array (a prediction, a probability map) back onto the original grid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError
from volumefusion.data.index import update_index
from volumefusion.data.store import (
    STORE_ENTRIES,
    CaseRecord,
    init_store,
    name_found_labels,
    read_record,
    safe_case_id,
    write_case,
)
from volumefusion.io import (
    SERIES_SEPARATOR,
    Geometry,
    atomic_write_text,
    case_id_from_path,
    discover_inputs,
    read_image,
)
from volumefusion.log import get_logger, progress

log = get_logger(__name__)

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
_AXIS_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass
class PrepareSettings:
    """How ``prepare`` turns a raw CT into a stored case (also recorded in the store)."""

    spacing_zyx: tuple[float, float, float] | None = None
    """target voxel spacing (mm, z y x); None keeps each image's native spacing."""
    crop_to_body: bool = True
    """crop the stored arrays to the body box."""
    body_threshold: float = -600.0
    """HU above which a voxel counts as body for the body box."""
    orientation: str = "LPS"
    """canonical orientation, DICOM letters for the x, y, z index axes (see module docstring)."""

    def __post_init__(self):
        if self.spacing_zyx is not None:
            self.spacing_zyx = tuple(float(s) for s in self.spacing_zyx)
            if len(self.spacing_zyx) != 3 or min(self.spacing_zyx) <= 0:
                raise VolumeFusionError(
                    f"spacing_zyx must be three positive numbers (mm), got {self.spacing_zyx}"
                )
        code = self.orientation.upper()
        if len(code) != 3 or sorted(_AXIS_LETTERS[c][0] for c in code if c in _AXIS_LETTERS) != [0, 1, 2]:
            raise VolumeFusionError(
                f"orientation {self.orientation!r} must be three letters, one of L/R, P/A, S/I each, e.g. LPS"
            )
        self.orientation = code

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spacing_zyx"] = list(self.spacing_zyx) if self.spacing_zyx is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrepareSettings:
        d = dict(d)
        if d.get("spacing_zyx") is not None:
            d["spacing_zyx"] = tuple(d["spacing_zyx"])
        return cls(**d)


@dataclass
class PreparedCase:
    """One case in prepared space.

    ``image`` int16 HU ``(z, y, x)``; ``label`` uint8 ``(z, y, x)`` or None; ``spacing_zyx`` mm;
    ``body_box`` half-open ``((z0, z1), (y0, y1), (x0, x1))`` in ``image`` voxels; ``restore``
    the JSON-serialisable recipe for :func:`restore_to_original`.
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing_zyx: tuple[float, float, float]
    body_box: Box
    restore: dict


# ---------------------------------------------------------------------------------------- reorient


def orientation_transform(direction: tuple[float, ...], code: str) -> tuple[list[int], list[int]]:
    """Axis permutation and flips that bring an array with ``direction`` to orientation ``code``.

    Returns ``(transpose, flip)`` in array axis order ``(z, y, x)``: the reoriented array is
    ``np.flip(array.transpose(transpose), flip)``.
    """
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # columns: index axes x, y, z
    # Each index axis goes to the physical axis it is most aligned with; greedy by alignment so a
    # 45-degree tie still yields a permutation.
    physical_of = [-1, -1, -1]
    for flat in np.argsort(-np.abs(matrix), axis=None):
        p, j = divmod(int(flat), 3)
        if physical_of[j] < 0 and p not in physical_of:
            physical_of[j] = p
    source_itk, flip_itk = [], []
    for i, letter in enumerate(code):
        p, sign = _AXIS_LETTERS[letter]
        j = physical_of.index(p)
        source_itk.append(j)
        if np.sign(matrix[p, j]) != sign:
            flip_itk.append(i)
    transpose = [2 - source_itk[2 - a] for a in range(3)]
    return transpose, sorted(2 - i for i in flip_itk)


def _reoriented_geometry(geometry: Geometry, transpose: list[int], flip: list[int]) -> Geometry:
    old_shape = np.array(geometry.shape_zyx)
    old_spacing = np.array(geometry.spacing_zyx)
    matrix = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    # Old voxel (z, y, x) that becomes the new first voxel: the far end along flipped axes.
    first = np.zeros(3)
    for a in flip:
        first[transpose[a]] = old_shape[transpose[a]] - 1
    offset_xyz = (first * old_spacing)[::-1]
    origin = np.asarray(geometry.origin) + matrix @ offset_xyz
    new_matrix = np.empty((3, 3))
    for a in range(3):  # new array axis a <- old array axis transpose[a]; ITK column = 2 - axis
        column = matrix[:, 2 - transpose[a]]
        new_matrix[:, 2 - a] = -column if a in flip else column
    new_matrix += 0.0  # turn -0.0 into 0.0
    return Geometry(
        tuple(old_shape[transpose]), tuple(old_spacing[transpose]), tuple(origin), tuple(new_matrix.ravel())
    )


def _reorient(array: np.ndarray, transpose: list[int], flip: list[int]) -> np.ndarray:
    lead = list(range(array.ndim - 3))
    out = array.transpose(lead + [len(lead) + t for t in transpose])
    return np.flip(out, [len(lead) + a for a in flip]) if flip else out


def _unreorient(array: np.ndarray, transpose: list[int], flip: list[int]) -> np.ndarray:
    lead = list(range(array.ndim - 3))
    if flip:
        array = np.flip(array, [len(lead) + a for a in flip])
    return array.transpose(lead + [len(lead) + int(t) for t in np.argsort(transpose)])


# ---------------------------------------------------------------------------------------- resample


def _resampled_geometry(geometry: Geometry, spacing_zyx: tuple[float, float, float]) -> Geometry:
    extent = np.array(geometry.shape_zyx) * np.array(geometry.spacing_zyx)
    shape = np.maximum(1, np.round(extent / np.array(spacing_zyx))).astype(int)
    return Geometry(tuple(shape), spacing_zyx, geometry.origin, geometry.direction)


def _resample(array: np.ndarray, source: Geometry, target: Geometry, order: int, fill: float) -> np.ndarray:
    """Resample ``array`` (z, y, x) from grid ``source`` onto grid ``target`` (order 0 nearest, 1 linear)."""
    import SimpleITK as sitk

    # SimpleITK has no bool or float16 pixels: compute in uint8 / float32, return the input dtype
    work = {np.dtype(np.bool_): np.uint8, np.dtype(np.float16): np.float32}.get(array.dtype, array.dtype)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=work))
    source.apply_to(image)
    reference = sitk.Image(list(reversed(target.shape_zyx)), image.GetPixelID())
    target.apply_to(reference)
    interpolator = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, float(fill), image.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(array.dtype, copy=False)


# ---------------------------------------------------------------------------------------- body box


def body_box(image: np.ndarray, threshold: float) -> Box:
    """Bounding box of the largest connected component of ``image > threshold`` (whole volume if none).

    Returns half-open ``((z0, z1), (y0, y1), (x0, x1))``.
    """
    from scipy import ndimage

    components, count = ndimage.label(image > threshold)
    if count == 0:
        return tuple((0, int(s)) for s in image.shape)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = ndimage.find_objects(components)[int(np.argmax(sizes)) - 1]
    return tuple((int(s.start), int(s.stop)) for s in largest)


def _union(a: Box, b: Box) -> Box:
    return tuple((min(p[0], q[0]), max(p[1], q[1])) for p, q in zip(a, b))


def _foreground_box(label: np.ndarray) -> Box | None:
    from scipy import ndimage

    boxes = ndimage.find_objects((label > 0).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    return tuple((int(s.start), int(s.stop)) for s in boxes[0])


# ---------------------------------------------------------------------------------------- forward


def _to_hu_int16(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.int16:
        return image
    if image.dtype.kind in "iub" and image.min() >= -32768 and image.max() <= 32767:
        return image.astype(np.int16)
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


def _to_label_uint8(label: np.ndarray) -> np.ndarray:
    if label.dtype == np.uint8:
        return label
    if label.dtype.kind == "f" and not np.array_equal(label, np.rint(label)):
        raise VolumeFusionError("label map has non-integer values; a label map holds class numbers 0..255")
    low, high = label.min(), label.max()
    if low < 0 or high > 255:
        raise VolumeFusionError(f"label values range {low}..{high}; a label map holds class numbers 0..255")
    return label.astype(np.uint8)


def preprocess_case(
    image: np.ndarray, geometry: Geometry, settings: PrepareSettings, label: np.ndarray | None = None
) -> PreparedCase:
    """Bring one image (and its label map, on the same grid) into prepared space.

    Args:
        image: ``(z, y, x)`` HU, any numeric dtype, as :func:`volumefusion.io.read_image` returns it.
        geometry: the image's geometry.
        settings: what to do (see module docstring).
        label: ``(z, y, x)`` class numbers 0..255 on the image grid, or None.

    Returns:
        A :class:`PreparedCase` (int16 image, uint8 label).
    """
    if image.shape != geometry.shape_zyx:
        raise ValueError(f"image shape {image.shape} does not match geometry {geometry.shape_zyx}")
    if label is not None and label.shape != image.shape:
        raise VolumeFusionError(f"label shape {label.shape} differs from image shape {image.shape}")
    transpose, flip = orientation_transform(geometry.direction, settings.orientation)
    oriented = _reoriented_geometry(geometry, transpose, flip)
    image = _reorient(image, transpose, flip)
    label = None if label is None else _reorient(_to_label_uint8(label), transpose, flip)

    resampled = None
    if settings.spacing_zyx is not None and tuple(settings.spacing_zyx) != oriented.spacing_zyx:
        resampled = _resampled_geometry(oriented, settings.spacing_zyx)
        fill = float(image.min())
        image = _resample(image.astype(np.float32), oriented, resampled, 1, fill)
        if label is not None:
            label = _resample(label, oriented, resampled, 0, 0)
    image = _to_hu_int16(image)

    box = body_box(image, settings.body_threshold)
    crop = tuple((0, int(s)) for s in image.shape)
    if settings.crop_to_body:
        crop = box
        foreground = None if label is None else _foreground_box(label)
        if foreground is not None:
            crop = _union(crop, foreground)
    region = tuple(slice(a, b) for a, b in crop)
    image = np.ascontiguousarray(image[region])
    label = None if label is None else np.ascontiguousarray(label[region])
    box_in_crop = tuple((a - c[0], b - c[0]) for (a, b), c in zip(box, crop))

    grid = resampled or oriented
    restore = {
        "version": 1,
        "original": geometry.to_dict(),
        "transpose": transpose,
        "flip": flip,
        "oriented": oriented.to_dict(),
        "resampled": None if resampled is None else resampled.to_dict(),
        "crop": [list(c) for c in crop],
    }
    return PreparedCase(image, label, grid.spacing_zyx, box_in_crop, restore)


def prepared_geometry(restore: dict) -> Geometry:
    """The physical geometry of the prepared (stored) array described by ``restore``."""
    grid = Geometry.from_dict(restore["resampled"] or restore["oriented"])
    start = np.array([c[0] for c in restore["crop"]], dtype=np.float64)
    matrix = np.asarray(grid.direction).reshape(3, 3)
    origin = np.asarray(grid.origin) + matrix @ (start * np.array(grid.spacing_zyx))[::-1]
    shape = tuple(int(b - a) for a, b in restore["crop"])
    return Geometry(shape, grid.spacing_zyx, tuple(origin), grid.direction)


# ---------------------------------------------------------------------------------------- backward


def restore_to_original(array: np.ndarray, restore: dict, *, order: int = 0, fill: float = 0) -> np.ndarray:
    """Map a prepared-space array back onto the original image grid.

    Args:
        array: ``(z, y, x)`` or ``(C, z, y, x)`` (e.g. class probabilities) in prepared space.
        restore: :attr:`PreparedCase.restore` / :attr:`CaseRecord.restore`.
        order: interpolation when the case was resampled: 0 nearest (labels), 1 linear (probabilities).
        fill: value outside the crop box.

    Returns:
        An array of the same dtype and leading dims whose last three dims equal the original
        ``shape_zyx``, aligned voxel for voxel with the original image.
    """
    crop = [tuple(c) for c in restore["crop"]]
    expected = tuple(b - a for a, b in crop)
    if tuple(array.shape[-3:]) != expected:
        raise ValueError(f"array shape {array.shape} does not match the prepared shape {expected}")
    oriented = Geometry.from_dict(restore["oriented"])
    resampled = Geometry.from_dict(restore["resampled"]) if restore["resampled"] else None
    grid = resampled or oriented
    lead = array.shape[:-3]
    full = np.full(lead + grid.shape_zyx, fill, dtype=array.dtype)
    full[(...,) + tuple(slice(a, b) for a, b in crop)] = array
    if resampled is not None:
        flat = full.reshape((-1,) + grid.shape_zyx)
        full = np.stack([_resample(c, resampled, oriented, order, fill) for c in flat])
        full = full.reshape(lead + oriented.shape_zyx)
    return np.ascontiguousarray(_unreorient(full, restore["transpose"], restore["flip"]))


# ---------------------------------------------------------------------------------------- batch


@dataclass
class CaseTask:
    """One case to prepare: where its image (and label) come from. Picklable for worker processes."""

    case_id: str
    image: str
    label: str | None = None
    channel: int | None = None
    allowed_labels: list[int] | None = None
    """label values the dataset declares (dataset.json); None accepts any 0..255."""


@dataclass
class PrepareSummary:
    """What a ``prepare`` run did. ``failed`` holds ``(input, reason)``; the reason names the file."""

    store: Path
    shard: tuple[int, int] = (0, 1)
    total: int = 0
    prepared: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        shard = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard[1] > 1 else ""
        lines = [
            f"{self.store}{shard}: {self.total} cases: {len(self.prepared)} prepared, "
            f"{len(self.skipped)} already done, {len(self.failed)} failed ({self.seconds:.1f} s)"
        ]
        lines += [f"  FAILED {reason}" for _, reason in self.failed]
        return "\n".join(lines)


def shard_of(case_id: str, count: int) -> int:
    """Which of ``count`` shards prepares ``case_id``: a stable hash, so every shard agrees."""
    return int(hashlib.sha1(case_id.encode()).hexdigest()[:12], 16) % count


def _absolute(path: str | Path) -> str:
    text = str(path)
    if SERIES_SEPARATOR in text:
        folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
        return f"{Path(folder).resolve()}{SERIES_SEPARATOR}{uid}"
    return str(Path(text).resolve())


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
            folders = [Path(_absolute(t.image).split(SERIES_SEPARATOR)[0]).parent for t in group]
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


def _grid_difference(image: Geometry, label: Geometry) -> str | None:
    """How the label grid differs from the image grid, or None if they match (to header precision)."""
    def text(values):
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    tolerance = 1e-2 * min(image.spacing_zyx)  # mm; headers may store float32: demand closeness only
    checks = [
        ("shape", image.shape_zyx == label.shape_zyx),
        ("spacing_zyx", np.allclose(image.spacing_zyx, label.spacing_zyx, rtol=1e-4, atol=0)),
        ("origin", np.allclose(image.origin, label.origin, rtol=0, atol=tolerance)),
        ("direction", np.allclose(image.direction, label.direction, rtol=0, atol=1e-4)),
    ]
    for name, same in checks:
        if not same:
            return f"{name} {text(getattr(label, name))} vs the image's {text(getattr(image, name))}"
    return None


def source_version(path: str) -> dict:
    """What identifies the version of a source on disk, to notice a file replaced in place.

    For an image file ``{"size": bytes, "mtime_ns": int}``; for a DICOM series folder (``path`` may
    carry a ``::UID``) ``{"files": count, "size": total bytes, "mtime_ns": newest}`` of its visible
    files. (The data file beside a ``.mhd``/``.nhdr`` header is not covered.)
    Raises OSError if the source is missing.
    """
    location = Path(path.rsplit(SERIES_SEPARATOR, 1)[0] if SERIES_SEPARATOR in path else path)
    if not location.is_dir():
        stat = location.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stats = [e.stat() for e in os.scandir(location) if e.is_file() and not e.name.startswith(".")]
    return {"files": len(stats), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _task_version(task: CaseTask) -> dict:
    """``{"image": version, "label": version or None}`` of a task's sources (see :func:`source_version`)."""
    return {"image": source_version(task.image),
            "label": None if task.label is None else source_version(task.label)}


def _source_changed(record: CaseRecord, task: CaseTask) -> bool:
    """Whether a stored case's sources differ from the version it was prepared from. Records written
    before versions were recorded have none and count as unchanged."""
    recorded = record.source_version
    if not recorded:
        return False
    try:
        return _task_version(task) != recorded
    except OSError:
        return True  # gone since discovery: preparing it again reports the problem


def prepare_case(task: CaseTask, store: str | Path, settings: PrepareSettings) -> None:
    """Read, preprocess and store one case; VolumeFusionError (naming the file) if the input is bad."""
    # Taken before reading: a file replaced while it is read then differs on the next run.
    try:
        version = _task_version(task)
    except OSError as exc:
        raise VolumeFusionError(f"{exc.filename}: cannot read ({exc.strerror})") from None
    image, geometry = read_image(task.image, channel=task.channel)
    label = None
    if task.label is not None:
        label, label_geometry = read_image(task.label)
        difference = _grid_difference(geometry, label_geometry)
        if difference:
            raise VolumeFusionError(
                f"{task.label}: label grid does not match image {task.image}: {difference}"
            )
        if task.allowed_labels is not None:
            extra = sorted(set(np.unique(label).tolist()) - set(task.allowed_labels))
            if extra:
                raise VolumeFusionError(
                    f"{task.label}: label values {extra} are not in dataset.json labels {task.allowed_labels}"
                )
    try:
        prepared = preprocess_case(image, geometry, settings, label)
    except VolumeFusionError as exc:
        raise VolumeFusionError(f"{task.label or task.image}: {exc}") from None
    # the record is written last, so a recorded version always belongs to the arrays beside it
    label_source = None if task.label is None else _absolute(task.label)
    write_case(store, prepared, case_id=task.case_id, source=_absolute(task.image), label_source=label_source,
               settings=settings.to_dict(), source_version=version)


def _run_task(task: CaseTask, store: str, settings: PrepareSettings) -> str | None:
    """Worker entry point: None on success, else the failure reason (never raises for bad input)."""
    try:
        prepare_case(task, store, settings)
    except VolumeFusionError as exc:
        return str(exc)
    except MemoryError:
        return f"{task.image}: out of memory while preparing; retry with fewer --workers"
    except Exception as exc:  # a bug or an exotic file must not stop the other cases
        return f"{task.image}: unexpected {type(exc).__name__}: {exc}"
    return None


def _execute(tasks: list[CaseTask], store: str, settings: PrepareSettings, workers: int, on_done) -> None:
    """Run ``_run_task`` over ``tasks`` with up to ``workers`` processes, calling ``on_done(task, error)``."""
    if workers <= 1:
        for task in tasks:
            on_done(task, _run_task(task, store, settings))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def new_pool():
        # spawn: no inherited threads or CUDA state in workers
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    pending = list(reversed(tasks))
    running: dict = {}
    pool, broken = new_pool(), False
    try:
        while pending or running:
            if broken and not running:
                pool.shutdown(wait=True)
                pool, broken = new_pool(), False
            while pending and not broken and len(running) < workers:
                task = pending.pop()
                running[pool.submit(_run_task, task, store, settings)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    error = future.result()
                except BrokenProcessPool:
                    broken = True
                    error = (f"{task.image}: a worker process died (out of memory or a crash in the image "
                             "reader) while this case was running; re-run to retry")
                on_done(task, error)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_writable(out: Path) -> None:
    """VolumeFusionError unless ``out`` is a store, an empty or missing folder (then created), or a
    folder that only a starting shard has written to, and files can be created in it."""
    if out.exists() and not out.is_dir():
        raise VolumeFusionError(f"{out}: is a file; --out takes a store folder")
    if out.is_dir() and not (out / "store.json").exists():
        # a store's own entries, or hidden ones (.DS_Store, another shard's probe), are no reason to stop
        foreign = sorted(p.name for p in out.iterdir() if p.name not in STORE_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise VolumeFusionError(
                f"{out}: folder holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                "and is not a store; give --out a new or empty folder"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        atomic_write_text(probe, "ok")
        probe.unlink()
    except OSError as exc:
        raise VolumeFusionError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


def prepare(
    inputs: list[str],
    out: str | Path,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    channel: int | None = None,
    label_dir: str | Path | None = None,
    label_names: dict[int, str] | None = None,
) -> PrepareSummary:
    """Prepare every case named by ``inputs`` into the store ``out``; see ``volumefusion prepare --help``.

    Bad inputs are reported in the summary and skipped; finished cases are skipped unless their image
    or label file changed since (size or modification time, see :func:`source_version`); ``shard=(i, n)``
    prepares only the cases whose id hashes to ``i`` (see :func:`shard_of`), so ``n`` runs with
    ``i = 0..n-1`` fill one store with disjoint cases. ``label_names`` names the classes of label
    maps given through ``label_dir`` (datasets bring their own from ``dataset.json``); without it
    the classes found are named ``label_K`` (see :func:`~volumefusion.data.store.name_found_labels`).
    """
    settings = settings or PrepareSettings()
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise VolumeFusionError(f"shard {index}/{count}: needs 0 <= i < n, e.g. 0/4 .. 3/4")
    out = Path(out)
    start = time.perf_counter()
    check_writable(out)
    tasks, dataset_names, failures = collect_cases(inputs, channel=channel, label_dir=label_dir)
    if not tasks and not failures:
        raise VolumeFusionError(f"no images found in {' '.join(map(str, inputs))}")
    init_store(out, settings.to_dict(), dataset_names or label_names)
    # Each input problem is reported by exactly one shard, so the shards' summaries add up.
    summary = PrepareSummary(store=out, shard=(index, count),
                             failed=[f for f in failures if shard_of(f[0], count) == index])
    mine = [t for t in tasks if shard_of(t.case_id, count) == index]
    summary.total = len(mine) + len(summary.failed)
    todo = []
    for task in mine:
        record = read_record(out, task.case_id)
        label_source = None if task.label is None else _absolute(task.label)
        if record is None:
            todo.append(task)
        elif record.source == _absolute(task.image) and record.label_source == label_source:
            if _source_changed(record, task):
                log.info("%s: source changed since it was prepared: re-preparing", task.case_id)
                todo.append(task)
            else:
                summary.skipped.append(task.case_id)
        elif record.source == _absolute(task.image):
            todo.append(task)  # same image, but its label was added or changed since
        else:
            summary.failed.append((task.image, f"{task.image}: duplicate case id {task.case_id!r}: the store "
                                               f"already holds it from {record.source}; rename the file, or "
                                               f"delete {out}/cases/{task.case_id}.json to replace it"))
    for _, reason in summary.failed:
        log.warning("%s", reason)
    bar = progress(total=len(todo), desc="prepare", unit="case")

    def on_done(task: CaseTask, error: str | None) -> None:
        if error is None:
            summary.prepared.append(task.case_id)
        else:
            summary.failed.append((task.image, error))
            log.warning("%s", error)
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed), refresh=False)

    try:
        _execute(todo, str(out), settings, workers, on_done)
    finally:
        bar.close()
    try:  # merge this run's cases into the store's index (naming found label classes reads it)
        if label_dir is not None and not (dataset_names or label_names):
            name_found_labels(out)
        else:
            update_index(out)
    except VolumeFusionError as exc:  # the cases are stored; the next Store.open rebuilds the index
        summary.failed.append((str(out), str(exc)))
        log.warning("%s", exc)
    summary.seconds = time.perf_counter() - start
    return summary
