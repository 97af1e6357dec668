"""Folder evaluation: every predicted label map against the reference of the same case.

:func:`evaluate_folders` pairs the files of two folders by case id, scores each pair with
:func:`volumefusion.metrics.evaluate_case` (in worker processes if asked) and writes a per-case CSV,
a JSON summary and one box plot per metric. :func:`evaluate_pair` scores one pair of files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from volumefusion import VolumeFusionError
from volumefusion.data.datasets import case_id_from_path, read_dataset_description
from volumefusion.data.store import safe_case_id
from volumefusion.files import atomic_write_text, missing_reason
from volumefusion.geometry import Geometry
from volumefusion.io import is_image_file, read_image
from volumefusion.log import get_logger, progress
from volumefusion.metrics import METRICS, both_empty_metrics, evaluate_case, summarise
from volumefusion.processes import worker_pool
from volumefusion.viz import save_boxplot

log = get_logger(__name__)

# Written into the JSON summary and shown by `volumefusion evaluate --help`.
CONVENTIONS = """\
metrics (per case and class; distances in mm from the image spacing):
  dice   2|P&R| / (|P|+|R|)
  hd95   max of the 95th percentiles of the surface distances P->R and R->P
  assd   mean of all surface distances P->R and R->P
  nsd    share of surface voxels of P and R within --tolerance mm of the other surface
  surface = voxels with a face neighbour outside the mask (as MONAI without sub-voxel areas)

empty masks (the conventions of MONAI and nnU-Net):
  class absent from exactly one of prediction and reference:  dice 0, nsd 0; hd95 and assd are
      undefined (no surface to measure to): NaN in the CSV, left out of the means, and counted
      as "undefined" in the summary, so a miss shows as dice 0 without a made-up distance.
  class absent from both (--both-empty):  one (default): dice 1, nsd 1, hd95 0, assd 0, a correct
      absence counts as perfect;  nan: every metric NaN, the case left out of that class's
      means (nnU-Net's choice for Dice).
  ref_voxels / pred_voxels in the CSV find these cases."""

def read_label_names(path: Path) -> dict[int, str]:
    """Foreground ``{value: name}`` of a ``dataset.json`` (MSD or nnU-Net v2); background left out."""
    return {v: n for v, n in read_dataset_description(path)[1].items() if v != 0}


def list_cases(folder: Path, role: str) -> dict[str, Path]:
    """``{case id: path}`` of the image files directly inside ``folder`` (sub-folders are not searched,
    so e.g. ``predict``'s ``probabilities/`` stay out). Ids are made file-name safe as ``predict`` names
    its outputs, so ``a b.nii.gz`` matches a prediction ``a_b.nii.gz``."""
    if not folder.is_dir():
        raise VolumeFusionError(f"--{role} {folder}: folder not found")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not is_image_file(path):
            continue
        if path.is_symlink() and not path.exists():
            raise VolumeFusionError(f"{path}: {missing_reason(path)}")
        if not path.is_file():
            continue
        case = safe_case_id(case_id_from_path(path))
        if case in cases:
            raise VolumeFusionError(
                f"--{role}: case {case} has two files, {cases[case].name} and {path.name}; keep one"
            )
        cases[case] = path
    if not cases:
        raise VolumeFusionError(f"--{role} {folder}: no NIfTI/NRRD/MHA label maps in the folder")
    return cases


def _check_same_grid(case: str, pred: Geometry, ref: Geometry) -> None:
    """Error naming the case when two :class:`~volumefusion.geometry.Geometry` differ (mm tolerances)."""
    checks = [("shape (z y x)", pred.shape_zyx, ref.shape_zyx, 0),
              ("spacing (z y x)", pred.spacing_zyx, ref.spacing_zyx, 1e-4),
              ("origin", pred.origin, ref.origin, 1e-3),
              ("direction", pred.direction, ref.direction, 1e-4)]
    for what, a, b, tol in checks:
        if not np.allclose(a, b, rtol=0, atol=tol):
            raise VolumeFusionError(
                f"case {case}: the prediction's {what} {tuple(round(v, 4) for v in a)} differs from the "
                f"reference's {tuple(round(v, 4) for v in b)}; predictions must be on the reference image's "
                "grid (volumefusion predict writes them so)"
            )


def _read_label_map(case: str, what: str, path: Path):
    """(array (z, y, x) of non-negative integers, geometry); errors name the case."""
    array, geometry = read_image(path)
    problem = None
    if array.dtype.kind not in "iub":
        if not np.array_equal(array, np.rint(array)):
            problem = "non-integer values"
        array = array.astype(np.int64)
    if problem is None and array.size and array.min() < 0:
        problem = "negative values"
    if problem:
        raise VolumeFusionError(f"case {case}: the {what} {path.name} has {problem}; a label map is needed")
    return array, geometry


def evaluate_pair(case: str, pred_path: Path, ref_path: Path, names: dict[int, str] | None,
                  tolerance_mm: float, both_empty: str = "one") -> list[dict]:
    """CSV rows of one case; without ``names``, every non-zero value present in either map."""
    pred, pred_geometry = _read_label_map(case, "prediction", pred_path)
    ref, ref_geometry = _read_label_map(case, "reference", ref_path)
    _check_same_grid(case, pred_geometry, ref_geometry)
    if names is None:  # find_objects lists every non-zero value present, without copying the arrays
        present = {v for a in (pred, ref) for v, box in enumerate(ndimage.find_objects(a), start=1) if box}
        names = {v: str(v) for v in sorted(present)}
    results = evaluate_case(pred, ref, ref_geometry.spacing_zyx, names, tolerance_mm, both_empty)
    return [{"case": case, "label": name, "value": value, **results[name]} for value, name in names.items()]


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, out: str | Path, names: dict[int, str] | None,
                     tolerance_mm: float, workers: int = 1, both_empty: str = "one") -> dict:
    """Evaluate every reference case; write the CSV ``out`` (NaN where a metric is undefined), the
    summary ``out.json`` and box plots ``out_<metric>.png``. Every reference case needs a prediction;
    predictions without a reference are ignored with a warning. ``both_empty``: the convention for a
    class absent from both maps, "one" or "nan" (:mod:`volumefusion.metrics`). Returns the JSON
    summary: ``cases``, ``per_class`` (``{name: {metric: {mean, std, median, min, max, n,
    undefined}}}``, statistics over the defined values, None where none is), ``both_empty``,
    ``mean_over_classes`` (``{metric: mean of the defined class means}``), ``conventions``.

    Example: ``evaluate_folders("preds", "labelsTs", "results/metrics.csv", {1: "spleen"}, 2.0)``.
    """
    pred_dir, gt_dir, out = Path(pred_dir), Path(gt_dir), Path(out)
    preds, refs = list_cases(pred_dir, "pred"), list_cases(gt_dir, "gt")
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise VolumeFusionError(f"{len(missing)} reference cases have no prediction in {pred_dir}: {shown}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%d predictions have no reference in %s and are ignored: %s", len(extra), gt_dir,
                    ", ".join(extra[:5]))
    cases = sorted(refs)
    jobs = [(c, preds[c], refs[c], names, tolerance_mm, both_empty) for c in cases]
    if workers > 1 and len(jobs) > 1:
        with worker_pool(min(workers, len(jobs))) as pool:
            per_case = list(progress(pool.map(evaluate_pair, *zip(*jobs)), total=len(jobs), desc="evaluate"))
    else:
        per_case = [evaluate_pair(*job) for job in progress(jobs, desc="evaluate")]

    if names is None:  # a class found in any case is scored in every case (as absent from both where absent)
        found = sorted({row["value"] for rows in per_case for row in rows})
        absent = {**both_empty_metrics(both_empty), "ref_voxels": 0.0, "pred_voxels": 0.0}
        for case, rows in zip(cases, per_case):
            have = {row["value"] for row in rows}
            rows.extend({"case": case, "label": str(v), "value": v, **absent} for v in found if v not in have)
            rows.sort(key=lambda row: row["value"])
    rows = [row for case_rows in per_case for row in case_rows]
    if not rows:
        raise VolumeFusionError(f"no classes to evaluate: every map in {gt_dir} and {pred_dir} is background "
                                "only; name the classes with --labels dataset.json")

    fields = ["case", "label", "value", *METRICS, "ref_voxels", "pred_voxels"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: int(row[k]) if k.endswith("_voxels") else row[k] for k in fields})
    atomic_write_text(out, text.getvalue())

    per_class = summarise(rows)
    summary = {
        "cases": len(cases),
        "nsd_tolerance_mm": tolerance_mm,
        "per_class": per_class,
        "both_empty": both_empty,
        "mean_over_classes": {m: _mean_of_defined([stats[m]["mean"] for stats in per_class.values()])
                              for m in METRICS},
        "conventions": CONVENTIONS,
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    for metric in METRICS:
        data = {label: [float(r[metric]) for r in rows if r["label"] == label] for label in per_class}
        unit = " (mm)" if metric in ("hd95", "assd") else ""
        save_boxplot(out.with_name(f"{out.stem}_{metric}.png"), data,
                     f"{metric} per class, {len(cases)} cases", ylabel=f"{metric}{unit}")
    return summary


def _mean_of_defined(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None if there are none."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
