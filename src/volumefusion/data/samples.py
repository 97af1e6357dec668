"""Real sample data that ships with an installable package.

The chest CT of the ``slicerio`` package (3D Slicer's sample data): ``CTChest4.nrrd``, int32 HU,
128 x 128 x 34 voxels (x y z), 3.05 x 3.05 x 10 mm, with ``Segmentation.seg.nrrd``, a label map of
7 classes (ribs, cervical / thoracic / lumbar vertebral column, right lung, left lung, tissue).
"""

from __future__ import annotations

import re
from pathlib import Path

from volumefusion import VolumeFusionError


def _slicerio_data() -> Path:
    try:
        import slicerio
    except ImportError:
        raise VolumeFusionError(
            "the sample chest CT comes with the slicerio package: pip install slicerio "
            "(or pip install 'volumefusion[samples]')"
        ) from None
    return Path(slicerio.__file__).parent / "data"


def chest_ct() -> tuple[Path, Path]:
    """Paths of the sample chest CT (NRRD) and its 7-class label map (Slicer ``.seg.nrrd``)."""
    folder = _slicerio_data()
    image, label = folder / "CTChest4.nrrd", folder / "Segmentation.seg.nrrd"
    for path in (image, label):
        if not path.is_file():
            raise VolumeFusionError(f"{path}: sample file missing from slicerio; reinstall slicerio")
    return image, label


def segment_names(path: str | Path) -> dict[int, str]:
    """Label value -> segment name from a 3D Slicer ``.seg.nrrd`` header (segments in layer 0).

    Returns an empty dict for a file without Slicer segment metadata.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())
    names = {}
    for key in keys:
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if not match:
            continue
        prefix = f"Segment{match.group(1)}_"
        layer = reader.GetMetaData(prefix + "Layer").strip() if prefix + "Layer" in keys else "0"
        if layer != "0" or prefix + "LabelValue" not in keys:
            continue  # other layers are further components of an overlapping segmentation
        names[int(reader.GetMetaData(prefix + "LabelValue"))] = reader.GetMetaData(key).strip()
    return dict(sorted(names.items()))


def chest_ct_label_names() -> dict[int, str]:
    """Class names of the sample chest CT's label map, read from its header (1..7; 0 is background)."""
    return {0: "background", **segment_names(chest_ct()[1])}
