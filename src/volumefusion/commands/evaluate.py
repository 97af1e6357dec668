"""``volumefusion evaluate``: Dice, HD95, ASSD and NSD of predicted label maps against references."""

from __future__ import annotations

import argparse
from pathlib import Path

from volumefusion import VolumeFusionError

OUTPUTS = """\
outputs (beside --out): CSV (one row per case and class; nan where a metric is undefined), JSON
summary (mean, std, median, min, max per class and metric over the defined values, with the count
of undefined ones) and one box plot PNG per metric. --out is checked before any case is evaluated."""


_CONVENTIONS = "{conventions}"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills in the metric conventions of :mod:`volumefusion.evaluate` only when help is shown, so
    building the parser does not import NumPy and SciPy."""

    def _format_text(self, text: str) -> str:
        if _CONVENTIONS in text:
            from volumefusion.evaluate import CONVENTIONS

            text = text.replace(_CONVENTIONS, CONVENTIONS)
        return super()._format_text(text)


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="Dice, HD95, ASSD and NSD of predictions against reference label maps",
        description="Compare every predicted label map in --pred with the reference of the same case\n"
                    "in --gt (cases match by file name without extension; both must be on the same\n"
                    "voxel grid).\n\n"
                    "example: volumefusion evaluate --pred preds/ --gt labelsTs/ --labels "
                    "Task09_Spleen/dataset.json --tolerance 2 --out results/metrics.csv\n\n"
                    + _CONVENTIONS + "\n\n" + OUTPUTS,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of reference label maps")
    p.add_argument("--labels", metavar="JSON",
                   help="dataset.json (MSD or nnU-Net v2) naming the classes to evaluate; default: every "
                        "non-zero value found in any case, named by its value")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="MM",
                   help="NSD tolerance in mm (default 1.0)")
    p.add_argument("--out", metavar="CSV",
                   help="per-case CSV; the JSON summary and PNG box plots go beside it "
                        "(default: PRED/metrics.csv)")
    p.add_argument("--both-empty", choices=("one", "nan"), default="one",
                   help="metrics of a class absent from both prediction and reference: one = perfect scores "
                        "(default), nan = undefined, left out of the means (see below)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="cases evaluated in parallel processes (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.tolerance >= 0 or args.tolerance == float("inf"):  # NaN fails every comparison
        raise VolumeFusionError(f"--tolerance {args.tolerance}: must be a finite number >= 0 mm")
    if args.workers < 1:
        raise VolumeFusionError(f"--workers {args.workers}: must be >= 1")
    from volumefusion.evaluate import evaluate_folders, read_label_names
    from volumefusion.files import check_writable_file

    out = Path(args.out) if args.out else Path(args.pred) / "metrics.csv"
    check_writable_file(out, "--out")  # before the cases are evaluated, not after
    names = read_label_names(Path(args.labels)) if args.labels else None
    summary = evaluate_folders(Path(args.pred), Path(args.gt), out, names, args.tolerance, args.workers,
                               both_empty=args.both_empty)
    metrics = ("dice", "hd95", "assd", "nsd")
    width = max([5, *(len(name) for name in summary["per_class"])])
    print(f"{summary['cases']} cases, NSD tolerance {args.tolerance:g} mm -> {out}")
    print(f"{'class':<{width}}  " + "  ".join(f"{h + ' mean±std':>15}" for h in metrics))
    for name, stats in summary["per_class"].items():
        cells = "  ".join(f"{'undefined':>15}" if stats[m]["mean"] is None else
                          f"{stats[m]['mean']:>8.3f}±{stats[m]['std']:<6.3f}" for m in metrics)
        undefined = [f"{m} in {stats[m]['undefined']}" for m in metrics if stats[m]["undefined"]]
        note = f"  (undefined: {', '.join(undefined)} of {summary['cases']} cases)" if undefined else ""
        print(f"{name:<{width}}  {cells}{note}")
    return 0


