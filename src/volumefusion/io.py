"""File I/O: atomic writes (every file the toolkit writes goes through these) and images with geometry.

Images are read with SimpleITK into a numpy array ``(z, y, x)`` in the file's native dtype plus a
:class:`Geometry` (ITK conventions: physical LPS millimetres, ``origin`` is the centre of voxel
``(0, 0, 0)``, ``direction`` the row-major 3x3 matrix whose columns are the x, y, z index axes).
Supported: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``)
and DICOM series (a folder, or ``folder::SERIES_UID`` to pick one series of several).

Geometry round trips exactly through MHA/MHD; through NRRD exactly for axis-aligned directions (a
rotated direction comes back within one float64 ulp, since NRRD stores direction times spacing);
through NIfTI to float32 precision (its header is float32), exactly for float32-representable
values and axis-aligned directions.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LIST_SUFFIXES = (".csv", ".txt")
SERIES_SEPARATOR = "::"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, else removed.

    The temporary name keeps the suffixes of ``path`` (``.nii.gz``, ``.npy``) so writers that look
    at the extension choose the right format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@dataclass(frozen=True)
class Geometry:
    """Where a ``(z, y, x)`` voxel array sits in physical space (ITK conventions, millimetres).

    ``shape_zyx`` and ``spacing_zyx`` are in array order; ``origin`` (x, y, z) and ``direction``
    (9 floats, row-major, columns = index axes x, y, z) are in ITK's physical order, as SimpleITK
    reports them.
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "shape_zyx", tuple(int(v) for v in self.shape_zyx))
        object.__setattr__(self, "spacing_zyx", tuple(float(v) for v in self.spacing_zyx))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.shape_zyx) != 3 or len(self.spacing_zyx) != 3 or len(self.origin) != 3:
            raise ValueError(f"Geometry needs 3 values for shape, spacing and origin, got {self}")
        if len(self.direction) != 9:
            raise ValueError(f"Geometry.direction needs 9 values, got {len(self.direction)}")

    def to_dict(self) -> dict:
        """JSON-serialisable; floats survive ``json`` exactly."""
        return {"shape_zyx": list(self.shape_zyx), "spacing_zyx": list(self.spacing_zyx),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(d["shape_zyx"]), tuple(d["spacing_zyx"]), tuple(d["origin"]), tuple(d["direction"]))

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        """Geometry of a 3D ``SimpleITK.Image``."""
        return cls(tuple(reversed(image.GetSize())), tuple(reversed(image.GetSpacing())),
                   image.GetOrigin(), image.GetDirection())

    def apply_to(self, image) -> None:
        """Set spacing, origin and direction of a 3D ``SimpleITK.Image`` (its size must match)."""
        if tuple(reversed(image.GetSize())) != self.shape_zyx:
            raise ValueError(f"image size {image.GetSize()} (x y z) does not match geometry {self.shape_zyx}")
        image.SetSpacing(tuple(reversed(self.spacing_zyx)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's own stderr warnings; problems surface as our exceptions instead."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _split_series(path: str | Path) -> tuple[Path, str | None]:
    text = str(path)
    if SERIES_SEPARATOR in text:
        folder, uid = text.rsplit(SERIES_SEPARATOR, 1)
        return Path(folder), uid
    return Path(text), None


def _dicom_series_files(folder: Path, uid: str | None) -> list[str]:
    """The slice files of the one DICOM series in ``folder`` (or of series ``uid``)."""
    import SimpleITK as sitk

    with _quiet_itk():
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise VolumeFusionError(f"{folder}: folder holds no DICOM series (and is not an image file)")
    if uid is None and len(ids) > 1:
        listing = "; ".join(
            f"{i} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i))} files)" for i in ids
        )
        raise VolumeFusionError(
            f"{folder}: folder holds {len(ids)} DICOM series: {listing}; pick one as '{folder}::SERIES_UID'"
        )
    if uid is not None and uid not in ids:
        raise VolumeFusionError(f"{folder}: no DICOM series {uid!r}; the folder holds: {', '.join(ids)}")
    with _quiet_itk():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid or ids[0]))


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a NIfTI-1/2 file must hold, from its header; None if not NIfTI."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348 and len(header) >= 112:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 176:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        return max(offset, size) + int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]])) * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """Raise if a NIfTI file is shorter than its header says; ITK would silently read zeros instead."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            expected = _nifti_expected_bytes(f.read(544))
    except (OSError, EOFError):
        return  # not gzip / unreadable: SimpleITK reports it
    if expected is None:
        return
    if not compressed:
        actual = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", f.read(4))[0]  # uncompressed size mod 2**32
        if trailer == expected % 2**32:
            return
        actual = 0  # several gzip members or a damaged end: count by decompressing
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error):
            raise VolumeFusionError(f"{path}: truncated or corrupt gzip data") from None
    if actual < expected:
        raise VolumeFusionError(f"{path}: truncated file: {actual} bytes, the header needs {expected}")


def _read_sitk(path: str | Path):
    import SimpleITK as sitk

    folder, uid = _split_series(path)
    if not folder.exists():
        raise VolumeFusionError(f"{folder}: file not found")
    try:
        if folder.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(folder, uid))
            with _quiet_itk():
                return reader.Execute()
        if folder.stat().st_size == 0:
            raise VolumeFusionError(f"{folder}: file is empty (0 bytes)")
        if folder.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(folder)
        with _quiet_itk():
            return sitk.ReadImage(str(folder))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise VolumeFusionError(
            f"{path}: cannot read image (corrupt, truncated or unsupported): {detail}"
        ) from None


def _select_channel(image, path, channel: int | None):
    """Reduce a vector or 4D image to 3D: component/volume ``channel``; error if none was chosen."""
    import SimpleITK as sitk

    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == 4:
        count = image.GetSize()[3]
        if count == 1:
            channel = 0 if channel is None else channel
        if channel is None:
            raise VolumeFusionError(
                f"{path}: 4D image with {count} volumes (size {image.GetSize()}); "
                f"choose one with channel=k / --channel k (0..{count - 1})"
            )
        if not 0 <= channel < count:
            raise VolumeFusionError(f"{path}: channel {channel} out of range; the image has {count} volumes")
        size = list(image.GetSize())
        size[3] = 0  # 0 collapses the dimension
        image = sitk.Extract(image, size=size, index=[0, 0, 0, channel])
    elif components > 1:
        if channel is None:
            raise VolumeFusionError(
                f"{path}: vector image with {components} components per voxel; "
                f"choose one with channel=k / --channel k (0..{components - 1})"
            )
        if not 0 <= channel < components:
            raise VolumeFusionError(
                f"{path}: channel {channel} out of range; the image has {components} components"
            )
        image = sitk.VectorIndexSelectionCast(image, channel)
    return image


def read_image(path: str | Path, *, channel: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image or DICOM series folder.

    Args:
        path: an image file, a DICOM series folder, or ``folder::SERIES_UID``.
        channel: for 4D or vector images, which volume/component to return.

    Returns:
        ``(array, geometry)``: array ``(z, y, x)`` in the file's native dtype (DICOM: rescaled HU).

    Raises:
        VolumeFusionError naming the file: missing, unreadable/corrupt, no or several DICOM series,
        2D image, 4D/vector image without ``channel``, non-finite values.
    """
    image = _read_sitk(path)
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) == 1):
        raise VolumeFusionError(f"{path}: 2D image (size {image.GetSize()}, x y z); a 3D volume is needed")
    if image.GetDimension() > 4:
        raise VolumeFusionError(f"{path}: {image.GetDimension()}D image; a 3D volume is needed")
    image = _select_channel(image, path, channel)
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise VolumeFusionError(f"{path}: {bad} voxels are NaN or infinite")
    return array, Geometry.from_sitk(image)


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry, *, compress: bool = True) -> None:
    """Write ``array`` ``(z, y, x)`` with ``geometry`` atomically; the format follows the extension.

    ``.mhd`` writes a header plus a data file beside it (both renamed into place, data first).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise VolumeFusionError(f"{path}: unknown image extension; use one of {', '.join(IMAGE_SUFFIXES)}")
    array = np.asarray(array)
    if array.ndim != 3 or array.shape != geometry.shape_zyx:
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape_zyx}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    if path.name.lower().endswith((".mhd", ".nhdr")):
        _write_detached(path, image, compress)
        return
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def _write_detached(path: Path, image, compress: bool) -> None:
    """Header + data file formats: write both in a private folder, move the data file, then the header."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(image, str(staging / path.name), compress)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_image_file(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


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


def _search_folder(folder: Path) -> list[Path]:
    """Image files and DICOM series folders under ``folder`` (hidden entries skipped)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        root_path = Path(root)
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
        folder, _ = _split_series(text)
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
    raise VolumeFusionError(f"{path}: file not found")


def discover_inputs(inputs: list[str | Path], errors: list[tuple[str, str]] | None = None) -> list[Path]:
    """Images named by ``inputs``, deduplicated, in sorted order.

    Each input may be an image file, a folder (searched recursively for NIfTI/NRRD/MHA files and
    DICOM series folders), a glob pattern, or a ``.csv``/``.txt`` list whose entries may be any of
    these (relative paths are relative to the list). An input or list entry that matches nothing
    raises VolumeFusionError, or, when ``errors`` is given, is appended to it as ``(input, reason)``
    and skipped, so one missing file does not stop a batch.
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
    folder, uid = _split_series(path)
    if uid is not None:
        return f"{folder.name}_{hashlib.sha1(uid.encode()).hexdigest()[:8]}"
    name = folder.name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name
