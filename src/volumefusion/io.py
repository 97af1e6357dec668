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
import errno
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
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual mode
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is None or Path(exc.filename) in (tmp_path, path.parent):
            # name the file being written, not its temporary twin (disk full, permissions)
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Make sure files can be created in ``folder``, or in the nearest folder above it that exists (where
    it will be created), before a command does its expensive part; VolumeFusionError naming the folder
    and the option ``what`` (``"--out"``) if not. Nothing is created: a run refused later leaves no
    empty folder behind (the writers create folders as they write)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VolumeFusionError(f"{folder}: is a file; {what} takes a folder")
    existing = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise VolumeFusionError(f"{folder}: cannot be created for {what}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise VolumeFusionError(f"{folder}: {what} folder is not writable ({exc.strerror or exc})") from None


def check_writable_file(path: str | Path, what: str) -> None:
    """Make sure a file can be written (atomically) at ``path``: not a folder, its folder writable;
    VolumeFusionError naming the path and the option ``what`` if not. An existing file is fine: it is
    replaced."""
    path = Path(path)
    if path.is_dir():
        raise VolumeFusionError(f"{path}: is a folder; {what} takes a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise VolumeFusionError(f"{path}: cannot be created for {what}: {path.parent} is a file")
    check_writable_folder(path.parent, what)


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with symbolic links resolved, as far as they resolve: a link loop is
    kept as it is instead of raising (the read that follows reports it)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: "Symlink loop" before Python 3.13
        return Path(os.path.abspath(path))


def missing_reason(path: str | Path) -> str:
    """Why ``path`` does not exist, for messages: a plain ``"file not found"``, ``"folder not
    found"`` when it was written as a folder, or what is wrong with the symbolic link it is."""
    as_folder = str(path).endswith(("/", os.sep))
    path = Path(path)
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symbolic link loop (following it leads back to itself)"
            return f"symbolic link to a missing {os.readlink(path)}"
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if parent != path.parent:
        return f"not found (no folder {path.parent})"
    return "folder not found" if as_folder else "file not found"


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


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def _nifti_layout(header: bytes) -> tuple[int, int, np.dtype | None] | None:
    """Where a NIfTI-1/2 file's voxels start and how many bytes they take, from its header, and
    their dtype if float (else None); None if ``header`` is not NIfTI."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348 and len(header) >= 112:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 176:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        count = int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]]))
        code = _NIFTI_FLOATS.get(datatype)
        return max(offset, size), count * bitpix // 8, np.dtype(order + code) if code else None
    return None


def _scan_nifti(path: Path, compressed: bool, offset: int, nbytes: int, dtype: np.dtype | None) -> tuple[int, int]:
    """Read the (decompressed) file through: its length in bytes, and with a float ``dtype`` how many
    of the ``nbytes`` voxel bytes after ``offset`` are NaN or infinite."""
    length = bad = 0
    item = dtype.itemsize if dtype is not None else 1
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            length += len(f.read(offset))
            while chunk := f.read((1 << 24) // item * item):
                if dtype is not None:
                    voxels = chunk[: max(0, offset + nbytes - length)]
                    voxels = np.frombuffer(voxels[: len(voxels) // item * item], dtype)
                    bad += int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
                length += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise VolumeFusionError(f"{path}: truncated or corrupt gzip data") from None
    return length, bad


def _non_finite_error(path, count: int) -> VolumeFusionError:
    return VolumeFusionError(f"{path}: {count} voxels are NaN or infinite")


def _truncated_error(path, actual: int, expected: int) -> VolumeFusionError:
    return VolumeFusionError(f"{path}: truncated file: {actual} bytes, the header needs {expected}")


def _check_nifti(path: Path, written: bool = False) -> None:
    """Raise if a NIfTI file is shorter than its header says, or holds NaN or infinite float voxels:
    ITK would silently read zeros for both. ``written``: a file just written, which must also have
    a complete NIfTI header (for reading, an unreadable one is left to SimpleITK to report)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            layout = _nifti_layout(f.read(544))
    except (OSError, EOFError, zlib.error):
        if written:
            raise VolumeFusionError(f"{path}: truncated or corrupt gzip data") from None
        return  # not gzip / unreadable: SimpleITK reports it
    if layout is None:
        if written:
            raise VolumeFusionError(f"{path}: no complete NIfTI header")
        return
    offset, nbytes, dtype = layout
    if written:
        dtype = None  # only completeness: NaN voxels are the writer's to choose
    expected, bad = offset + nbytes, 0
    if dtype is not None:
        actual, bad = _scan_nifti(path, compressed, offset, nbytes, dtype)
    elif not compressed:
        actual = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", f.read(4))[0]  # uncompressed size mod 2**32
        if trailer == expected % 2**32:
            return
        actual = _scan_nifti(path, compressed, 0, 0, None)[0]  # several gzip members or a damaged end
    if actual < expected:
        raise _truncated_error(path, actual, expected)
    if bad:
        raise _non_finite_error(path, bad)


# bytes per MetaIO element type; MET_LONG as 4, the smaller size it may mean, so a complete file always passes
_METAIO_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                 "MET_DOUBLE": 8}


def _check_metaimage_complete(path: Path) -> None:
    """Raise if a MetaImage's voxel data is shorter than its header says, inside the file
    (``ElementDataFile = LOCAL``, ``.mha``) or in the one data file beside a ``.mhd``: MetaIO would
    print to the console and ITK blame a missing file."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    fields: dict[str, str] = {}
    start = 0
    for line in head.split(b"\n"):
        start += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return
    try:
        if fields.get("CompressedData", "False").lower() == "true":
            nbytes = int(fields.get("CompressedDataSize", 0))  # absent: MetaIO reads to the end
        else:
            nbytes = (int(np.prod([int(v) for v in fields["DimSize"].split()]))
                      * int(fields.get("ElementNumberOfChannels", 1)) * _METAIO_BYTES[fields["ElementType"]])
    except (KeyError, ValueError):
        return  # a header ITK may still understand (or report)
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        data, start_in_data = path, start
    elif name == "LIST" or " " in name or "%" in name:
        return  # a list of slice files: ITK reports those itself
    else:
        data, start_in_data = path.parent / name, 0
        if not os.path.lexists(data):
            raise VolumeFusionError(f"{path}: its data file {data}: {missing_reason(data)}")
        if not data.is_file():
            return  # a pipe or device: its length is not known beforehand
    size = data.stat().st_size
    if size < start_in_data + nbytes:
        if data == path:
            raise _truncated_error(path, size, start_in_data + nbytes)
        raise VolumeFusionError(f"{path}: truncated data file {data.name}: {size} bytes, the header needs {nbytes}")


def _check_slice_gaps(folder: Path, reader, image) -> None:
    """Raise if a DICOM series' slices are unevenly spaced (missing or duplicate slices): ITK would
    spread them over one averaged spacing and misplace every slice after a gap."""
    names = reader.GetFileNames()
    key = "0020|0032"  # ImagePositionPatient: x\y\z of the slice's first voxel, mm
    if len(names) < 3 or not all(reader.HasMetaDataKey(i, key) for i in range(len(names))):
        return
    try:
        points = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(len(names))])
    except ValueError:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    steps = np.diff(points @ normal)
    expected = float(np.median(steps))
    uneven = np.abs(steps - expected) > max(0.01 * abs(expected), 0.01)
    if uneven.any():
        found = ", ".join(f"{v:.4g}" for v in sorted({round(float(s), 4) for s in steps[uneven]}))
        first = Path(names[int(np.flatnonzero(uneven)[0])]).name
        raise VolumeFusionError(
            f"{folder}: DICOM series with missing or extra slices: slice gaps should all be {expected:.4g} mm, "
            f"found {found} mm (first after {first}); export the complete series"
        )


def _read_sitk(path: str | Path):
    import SimpleITK as sitk

    folder, uid = _split_series(path)
    if not folder.exists():
        raise VolumeFusionError(f"{folder}: {missing_reason(folder)}")
    try:
        if folder.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(folder, uid))
            reader.MetaDataDictionaryArrayUpdateOn()
            with _quiet_itk():
                image = reader.Execute()
            _check_slice_gaps(folder, reader, image)
            return image
        if folder.stat().st_size == 0:
            raise VolumeFusionError(f"{folder}: file is empty (0 bytes)")
        if folder.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti(folder)
        if folder.name.lower().endswith((".mha", ".mhd")):
            _check_metaimage_complete(folder)
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
        raise _non_finite_error(path, int(array.size - np.isfinite(array).sum()))
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
        _sitk_write(image, tmp, path, compress)


def _sitk_write(image, target: Path, path: Path, compress: bool) -> None:
    """``sitk.WriteImage`` to ``target``; its failures (a full disk, say) as OSError naming ``path``."""
    import SimpleITK as sitk

    try:
        sitk.WriteImage(image, str(target), compress)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise OSError(errno.EIO, f"cannot write the image: {detail}", str(path)) from None
    # ITK does not notice failed writes (a full disk): check the file holds what its header says
    try:
        if target.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti(target, written=True)
        elif target.name.lower().endswith((".mha", ".mhd")):
            _check_metaimage_complete(target)
        else:
            with _quiet_itk():
                sitk.ReadImage(str(target))
    except (VolumeFusionError, RuntimeError):
        raise OSError(errno.EIO, "the image could not be written completely (disk full?)", str(path)) from None


def _write_detached(path: Path, image, compress: bool) -> None:
    """Header + data file formats: write both in a private folder, move the data file, then the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _sitk_write(image, staging / path.name, path, compress)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sniff_image_format(head: bytes) -> str | None:
    """The image format a file's first bytes (at least 544, gzip already undone) show: ``"NIfTI"``,
    ``"NRRD"``, ``"MetaImage"`` or ``"DICOM"``; None for anything else. For messages about files given
    in the wrong place, e.g. a CT passed as a checkpoint."""
    if len(head) >= 4 and _nifti_layout(head[:544]) is not None:
        return "NIfTI"
    if head.startswith(b"NRRD"):
        return "NRRD"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "MetaImage"
    if head[128:132] == b"DICM":
        return "DICOM"
    return None


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
    folder, uid = _split_series(path)
    if uid is not None:
        return f"{folder.name}_{hashlib.sha1(uid.encode()).hexdigest()[:8]}"
    name = folder.name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name
