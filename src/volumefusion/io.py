"""Images with their geometry: reading (checked), writing (atomic) and recognising image files.

Images are read with SimpleITK into a numpy array ``(z, y, x)`` in the file's native dtype plus a
:class:`~volumefusion.geometry.Geometry` (ITK conventions: physical LPS millimetres, ``origin`` is the
centre of voxel ``(0, 0, 0)``, ``direction`` the row-major 3x3 matrix whose columns are the x, y, z
index axes). Supported: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``) and DICOM series (a folder, or ``folder::SERIES_UID`` to pick one series of several).

Geometry round trips exactly through MHA/MHD; through NRRD exactly for axis-aligned directions (a
rotated direction comes back within one float64 ulp, since NRRD stores direction times spacing);
through NIfTI to float32 precision (its header is float32), exactly for float32-representable
values and axis-aligned directions.

Which files a list of inputs names (folders, globs, lists, datasets) is :mod:`volumefusion.data.datasets`;
atomic writes and writability checks are :mod:`volumefusion.files`.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from volumefusion import VolumeFusionError, files
from volumefusion.deprecated import moved
from volumefusion.files import short_name, write_failure
from volumefusion.geometry import Geometry

__all__ = ["IMAGE_SUFFIXES", "SERIES_SEPARATOR", "Geometry", "is_image_file", "read_image", "sniff_image_format",
           "split_series", "write_image"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SERIES_SEPARATOR = "::"


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


def split_series(path: str | Path) -> tuple[Path, str | None]:
    """``(folder, SERIES_UID)`` of ``folder::SERIES_UID``; ``(path, None)`` for any other path."""
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


def _nifti_layout(header: bytes) -> tuple[int, int, np.dtype | None, tuple[float, ...]] | None:
    """Where a NIfTI-1/2 file's voxels start and how many bytes they take, from its header, their
    dtype if float (else None), and the voxel sizes of its spatial axes (``pixdim[1..3]``, as stored);
    None if ``header`` is not NIfTI."""
    if len(header) < 4:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348 and len(header) >= 112:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            pixdim = struct.unpack(order + "8f", header[76:108])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 176:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            pixdim = struct.unpack(order + "8d", header[104:168])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        count = int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]]))
        code = _NIFTI_FLOATS.get(datatype)
        spatial = tuple(pixdim[1 : 1 + min(dims[0], 3)])
        return max(offset, size), count * bitpix // 8, np.dtype(order + code) if code else None, spatial
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
    offset, nbytes, dtype, voxel_size = layout
    if not all(math.isfinite(v) for v in voxel_size):
        # ITK would put 1 mm in their place without a word (with qform and sform codes 0)
        raise VolumeFusionError(f"{path}: its header's voxel size (pixdim[1:{1 + len(voxel_size)}]) is "
                                f"{[float(v) for v in voxel_size]}, not finite numbers of mm; write the file again "
                                "with the scan's voxel size")
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
            raise VolumeFusionError(f"{path}: its data file {data}: {files.missing_reason(data)}")
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

    folder, uid = split_series(path)
    if not folder.exists():
        raise VolumeFusionError(f"{folder}: {files.missing_reason(folder)}")
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
    with files.atomic_path(path) as tmp:
        _sitk_write(image, tmp, path, compress)


def _sitk_write(image, target: Path, path: Path, compress: bool) -> None:
    """``sitk.WriteImage`` to ``target``; its failures (a full disk, say) as OSError naming ``path``."""
    import SimpleITK as sitk

    try:
        sitk.WriteImage(image, str(target), compress)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1].replace("sitk::ERROR: ", "")
        raise write_failure(path, f"cannot write the image: {detail}") from None
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
        raise write_failure(path, "the image could not be written completely (disk full?)") from None


def _write_detached(path: Path, image, compress: bool) -> None:
    """Header + data file formats: write both in a private folder, move the data file, then the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{short_name(path.name)}.", suffix=".tmp", dir=path.parent))
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


# the input-discovery names (discover_inputs, case_id_from_path, LIST_SUFFIXES) went up to
# volumefusion.data.datasets without an alias: a lower room does not point up for an old name
__getattr__ = moved(__name__, dict.fromkeys(
    ("atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable_folder", "check_writable_file",
     "resolved", "missing_reason"), "volumefusion.files"))
