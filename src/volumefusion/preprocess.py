"""Per-case preprocessing: raw CT -> prepared space and back, and HU normalisation.

Used by ``prepare`` (to fill a store), by prediction (new images go through the same steps as
training data) and by training (:func:`normalise_hu`).

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
:func:`suspicious_values` says what in an image does not look like CT in HU, for warnings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from volumefusion import VolumeFusionError
from volumefusion.geometry import Geometry

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
BODY_THRESHOLD_HU = -600.0
"""HU above which a voxel counts as body (air and lung lie below it): the body box of ``prepare``
and of the pictures of ``show``."""
_AXIS_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass
class PrepareSettings:
    """How ``prepare`` turns a raw CT into a stored case (also recorded in the store)."""

    spacing_zyx: tuple[float, float, float] | None = None
    """target voxel spacing (mm, z y x); None keeps each image's native spacing."""
    crop_to_body: bool = True
    """crop the stored arrays to the body box."""
    body_threshold: float = BODY_THRESHOLD_HU
    """HU above which a voxel counts as body for the body box."""
    orientation: str = "LPS"
    """canonical orientation, DICOM letters for the x, y, z index axes (see module docstring)."""

    def __post_init__(self):
        if self.spacing_zyx is not None:
            self.spacing_zyx = tuple(float(s) for s in self.spacing_zyx)
            if len(self.spacing_zyx) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing_zyx):
                raise VolumeFusionError(
                    f"spacing_zyx must be three positive, finite numbers (mm), got {self.spacing_zyx}"
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


def check_spacing(spacing_zyx: tuple[float, ...]) -> tuple[float, ...]:
    """``spacing_zyx``, or VolumeFusionError naming it unless every voxel size is a positive, finite mm."""
    if not all(np.isfinite(s) and s > 0 for s in spacing_zyx):
        raise VolumeFusionError(f"spacing_zyx {tuple(spacing_zyx)}: voxel sizes must be positive, finite numbers "
                                "of mm")
    return spacing_zyx


def check_volume(image: np.ndarray, geometry: Geometry) -> None:
    """VolumeFusionError, naming the field, unless ``image`` is a numeric volume of finite values and
    ``geometry`` a usable grid: positive, finite spacings, a finite origin and an invertible direction.
    (A file's reader refuses such files; this holds arrays given in memory to the same rules.)"""
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
        raise VolumeFusionError(f"image: dtype {image.dtype} is not numeric; give HU values")
    if np.issubdtype(image.dtype, np.inexact):
        bad = image.size - int(np.count_nonzero(np.isfinite(image)))
        if bad:
            raise VolumeFusionError(f"image: {bad} of {image.size} voxels are NaN or infinite")
    check_spacing(geometry.spacing_zyx)
    if not np.isfinite(geometry.origin).all():
        raise VolumeFusionError(f"origin {tuple(geometry.origin)}: must be finite numbers of mm")
    direction = np.asarray(geometry.direction).reshape(3, 3)
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6:
        raise VolumeFusionError(f"direction {tuple(geometry.direction)}: must be an invertible 3x3 matrix "
                                "(9 finite numbers, ITK order; the identity for LPS)")


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
        A :class:`PreparedCase` (int16 image, uint8 label). VolumeFusionError for what
        :func:`check_volume` refuses.
    """
    if image.shape != geometry.shape_zyx:
        raise ValueError(f"image shape {image.shape} does not match geometry {geometry.shape_zyx}")
    check_volume(image, geometry)
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


# ---------------------------------------------------------------------------------------- intensity


def normalise_hu(x: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> torch.Tensor:
    """Clip HU to ``window`` and map it linearly to [-1, 1].

    ``x``: any shape, int16 or float HU, any device. Returns float32 of the same shape.
    """
    low, high = window
    x = x.float().clamp_(low, high) if x.dtype != torch.float32 else x.clamp(low, high)
    return x.sub_(low).mul_(2.0 / (high - low)).sub_(1.0)


# ---------------------------------------------------------------------------------------- plausibility


PLAUSIBLE_SPACING_MM = (0.2, 10.0)
"""Voxel sides outside this range (mm) are unusual for CT: a header in other units or a damaged one."""
AIR_HU = -500.0
"""A CT whose lowest value is above this has no air anywhere: likely not in Hounsfield units."""


def suspicious_values(image: np.ndarray, spacing_zyx: tuple[float, float, float]) -> list[str]:
    """Why ``image`` ((z, y, x), any numeric dtype, meant to be HU) with ``spacing_zyx`` (mm) may not be
    the CT it should be, one phrase per finding (empty if none), for warnings that name the file:
    values beyond int16 (clipped when stored), no air, a constant image, a spacing outside
    :data:`PLAUSIBLE_SPACING_MM`."""
    found = []
    low, high = float(image.min()), float(image.max())
    if low < -32768 or high > 32767:
        found.append(f"values {low:g}..{high:g} HU exceed int16 and are clipped to -32768..32767")
    if low == high:
        found.append(f"every voxel is {low:g}: an empty or blank image")
    elif low > AIR_HU:
        found.append(f"lowest value {low:g}: no air (about -1000 HU) anywhere; is this CT in Hounsfield units?")
    small, large = PLAUSIBLE_SPACING_MM
    if min(spacing_zyx) < small or max(spacing_zyx) > large:
        spacing = " x ".join(f"{s:g}" for s in spacing_zyx)
        found.append(f"voxel spacing {spacing} mm (z y x) is outside the usual {small:g}..{large:g} mm of CT; "
                     "check the header's units")
    return found
