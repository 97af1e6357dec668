"""Segmentation metrics per class: Dice, HD95, ASSD and NSD, with distances in millimetres.

Definitions (they follow MONAI's ``compute_dice``, ``compute_hausdorff_distance(percentile=95)``,
``compute_average_surface_distance(symmetric=True)`` and ``compute_surface_dice`` without
sub-voxel areas, so numbers are comparable with papers that use MONAI):

- **Surface** of a mask: its voxels that have at least one of their 6 face neighbours outside the
  mask (``mask XOR erode(mask)`` with the 6-connected cross); voxels on the image border count as
  surface, i.e. the outside of the image is background.
- **Surface distances** ``d(P->R)``: for every surface voxel of the prediction, the Euclidean
  distance in mm (voxel centres, anisotropic ``spacing_zyx``) to the nearest surface voxel of the
  reference; ``d(R->P)`` likewise. They come from ``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing_zyx`` on the bounding box of ``P | R`` plus a one-voxel margin, which gives the
  same distances as the whole image (every nearest surface voxel lies inside that box) in far less time.
- **Dice** ``2|P & R| / (|P| + |R|)``.
- **HD95** ``max(q95(d(P->R)), q95(d(R->P)))``, the 95th percentiles with linear interpolation.
- **ASSD** mean of ``d(P->R)`` and ``d(R->P)`` pooled together.
- **NSD** (normalised surface Dice at tolerance ``tau`` mm): surface voxels of both masks whose
  distance to the other surface is ``<= tau``, divided by the number of surface voxels of both
  (every surface voxel weighs the same; no sub-voxel surface areas).

Conventions for empty masks (those of MONAI and nnU-Net, which report undefined values as NaN
and average over the defined ones):

- exactly one of prediction and reference empty (organ missed, or predicted where there is none):
  Dice 0 and NSD 0; HD95 and ASSD are undefined (no surface to measure to) and are NaN. (MONAI gives
  NaN for HD95 and inf for ASSD; NaN for both keeps every mean finite and says the same thing.)
- both empty (class correctly absent), ``both_empty``: ``"one"`` (default) scores it as perfect,
  Dice 1, NSD 1, HD95 0, ASSD 0, so a correct absence counts; ``"nan"`` makes every metric NaN, so
  the case is left out of that class's means, as nnU-Net (Dice NaN) and MONAI (``ignore_empty``) do.
- :func:`summarise` takes mean, std, median, min and max over the defined values and reports the
  number of undefined ones beside them (``undefined``), so a miss is never hidden.

``ref_voxels`` and ``pred_voxels`` are reported beside the metrics so empty cases can be found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

METRICS = ("dice", "hd95", "assd", "nsd")
NAN = float("nan")
BOTH_EMPTY = {"one": {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0},
              "nan": {"dice": NAN, "hd95": NAN, "assd": NAN, "nsd": NAN}}
"""The metrics of a class absent from both prediction and reference, per ``both_empty`` convention."""
ONE_EMPTY = {"dice": 0.0, "hd95": NAN, "assd": NAN, "nsd": 0.0}
"""The metrics when exactly one of prediction and reference is empty: distances are undefined."""


def both_empty_metrics(convention: str) -> dict[str, float]:
    """The metrics of a class absent from both masks under ``convention`` ("one" or "nan")."""
    if convention not in BOTH_EMPTY:
        raise ValueError(f"both_empty {convention!r}: choose one of {', '.join(BOTH_EMPTY)}")
    return dict(BOTH_EMPTY[convention])

_CROSS = ndimage.generate_binary_structure(3, 1)


def label_names(labels: Mapping[int, str] | Sequence[int]) -> dict[int, str]:
    """``{label value: name}``; a plain list of values is named by the values themselves."""
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    return {int(v): str(int(v)) for v in labels}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean (z, y, x) mask: voxels with a 6-neighbour outside the mask."""
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to the surface of ``ref``, and back.

    ``pred``, ``ref``: boolean (z, y, x) masks, both non-empty. Returns two float64 vectors,
    ``d(P->R)`` (one per surface voxel of ``pred``) and ``d(R->P)``.
    """
    box = _bounding_box(pred | ref, margin=1)
    pred, ref = pred[box], ref[box]
    surf_p, surf_r = _surface(pred), _surface(ref)
    sampling = np.asarray(spacing_zyx, dtype=np.float64)
    to_ref = ndimage.distance_transform_edt(~surf_r, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surf_p, sampling=sampling)
    return to_ref[surf_p], to_pred[surf_r]


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of ``mask``, grown by ``margin``."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _union_box(a: slice | None, b: slice | None, shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    boxes = [s for s in (a, b) if s is not None]
    return tuple(
        slice(max(min(s[d].start for s in boxes) - margin, 0), min(max(s[d].stop for s in boxes) + margin, n))
        for d, n in enumerate(shape)
    )


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float],
                   nsd_tolerance_mm: float = 1.0, both_empty: str = "one") -> dict[str, float]:
    """Dice, HD95 (mm), ASSD (mm) and NSD of two boolean (z, y, x) masks on the same grid.

    See the module docstring for the definitions and the empty-mask conventions (``both_empty``:
    "one" or "nan"); undefined values are NaN.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    counts = {"ref_voxels": float(n_ref), "pred_voxels": float(n_pred)}
    if n_pred == 0 and n_ref == 0:
        return {**both_empty_metrics(both_empty), **counts}
    if n_pred == 0 or n_ref == 0:
        return {**ONE_EMPTY, **counts}
    dice = 2.0 * np.count_nonzero(pred & ref) / (n_pred + n_ref)
    d_pr, d_rp = surface_distances(pred, ref, spacing_zyx)
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    assd = (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size)
    nsd = (np.count_nonzero(d_pr <= nsd_tolerance_mm) + np.count_nonzero(d_rp <= nsd_tolerance_mm)) / (
        d_pr.size + d_rp.size
    )
    return {"dice": float(dice), "hd95": float(hd95), "assd": float(assd), "nsd": float(nsd), **counts}


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float],
                  labels: Mapping[int, str] | Sequence[int], nsd_tolerance_mm: float = 1.0,
                  both_empty: str = "one") -> dict[str, dict[str, float]]:
    """Per-class metrics of a predicted label map against the reference.

    ``pred``, ``ref``: (z, y, x) integer label maps on the same grid; ``spacing_zyx``: voxel size in
    mm; ``labels``: ``{value: name}`` or a list of values (named by their value) to evaluate;
    ``both_empty``: the convention for a class absent from both ("one" or "nan", module docstring).
    Returns ``{name: {"dice", "hd95", "assd", "nsd", "ref_voxels", "pred_voxels": float}}`` with
    distances in mm, NaN where undefined.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if len(spacing_zyx) != pred.ndim:
        raise ValueError(f"spacing_zyx {tuple(spacing_zyx)} needs one value per axis of shape {pred.shape}")
    names = label_names(labels)
    absent = both_empty_metrics(both_empty)
    # One pass over each volume finds every label's bounding box, so each class is then
    # compared on its own small crop instead of the whole image.
    boxes_p = _label_boxes(pred, max(names, default=0))
    boxes_r = _label_boxes(ref, max(names, default=0))
    out = {}
    for value, name in names.items():
        box_p, box_r = boxes_p.get(value), boxes_r.get(value)
        if box_p is None and box_r is None:
            out[name] = {**absent, "ref_voxels": 0.0, "pred_voxels": 0.0}
            continue
        box = _union_box(box_p, box_r, pred.shape, margin=1)
        out[name] = binary_metrics(pred[box] == value, ref[box] == value, spacing_zyx, nsd_tolerance_mm,
                                   both_empty)
    return out


def _label_boxes(labels: np.ndarray, max_label: int) -> dict[int, tuple[slice, ...]]:
    """Bounding box of every label value in ``1..max_label`` present in ``labels``; 0 gets the image box
    when present."""
    arr = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)
    boxes = {}
    # find_objects ignores values <= 0 and counts only up to max_label, so foreign values cost nothing.
    for value, box in enumerate(ndimage.find_objects(arr, max_label=max_label), start=1):
        if box is not None:
            boxes[value] = box
    if (arr == 0).any():
        boxes[0] = tuple(slice(0, n) for n in arr.shape)
    return boxes


def summarise(rows: Sequence[Mapping[str, object]], metrics: Sequence[str] = METRICS
               ) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Mean, std (population), median, min and max of each metric per class over its defined values,
    with their count ``n`` and the count of undefined (NaN) values ``undefined``.

    ``rows``: dicts with a ``"label"`` key and one float per metric (the CSV rows of ``evaluate``).
    Returns ``{label: {metric: {"mean", "std", "median", "min", "max", "n", "undefined"}}}`` in
    first-seen order; the statistics are None when no value of a metric is defined.
    """
    by_label: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        per_metric = by_label.setdefault(str(row["label"]), {m: [] for m in metrics})
        for m in metrics:
            per_metric[m].append(float(row[m]))
    out = {}
    for label, per_metric in by_label.items():
        out[label] = {}
        for m, values in per_metric.items():
            v = np.asarray(values, dtype=np.float64)
            defined = v[~np.isnan(v)]
            stats: dict[str, float | int | None] = dict.fromkeys(("mean", "std", "median", "min", "max"))
            if defined.size:
                stats = {"mean": float(defined.mean()), "std": float(defined.std()),
                         "median": float(np.median(defined)), "min": float(defined.min()),
                         "max": float(defined.max())}
            out[label][m] = {**stats, "n": int(defined.size), "undefined": int(v.size - defined.size)}
    return out
