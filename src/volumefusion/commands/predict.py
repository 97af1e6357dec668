"""``volumefusion predict``: segment CT images with a fine-tuned checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from volumefusion import VolumeFusionError

EPILOG = """\
outputs (in OUT_DIR):
  CASE.nii.gz                      label map, uint8 class indices of the checkpoint's task, on the
                                   input's exact grid (size, spacing, origin, direction)
  probabilities/CASE_classK.nii.gz with --save-probabilities: one map per class K, uint8, where
                                   probability = value / 255 (linearly resampled if the checkpoint
                                   resamples); 1 byte per voxel and class
  CASE is the input file name without extension (a DICOM folder's name). With --format same the
  input's format is kept (DICOM series are written as NIfTI).

memory: windows run slab by slab along z and only labels are kept for the whole volume: a
512x512x600 CT with the paper PCT-Net and window batch 4 peaks at about 6.5 GB of RAM on CPU
(--window-batch 1 saves about 3 GB). --save-probabilities adds about 3 bytes per voxel and class.
A case that fails is reported and skipped; the exit status is 1 if any case failed."""


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="segment CT images with a fine-tuned checkpoint (sliding window, original geometry)",
        description="Segment each input with the checkpoint's network and preprocessing (reorientation,\n"
                    "spacing, body crop and HU window exactly as in training) by Gaussian-weighted sliding\n"
                    "windows (bf16 on GPU), and write the labels on the input's grid.\n\n"
                    "example: volumefusion predict -m runs/ft/checkpoints/best.pt -i ct/ scan.nrrd "
                    "dicom/patient7/ -o preds/ --tta\n\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-m", "--model", required=True, metavar="CKPT", help="checkpoint written by finetune")
    p.add_argument("-i", "--input", required=True, nargs="+", metavar="INPUT",
                   help="image files (NIfTI, NRRD, MHA), folders (searched recursively), DICOM series "
                        "folders (folder::SERIES_UID picks one series), globs or .txt/.csv lists")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--overlap", type=float, default=None,
                   help="share of a window overlapping its neighbour, [0, 1) (default: the checkpoint's "
                        "finetune.overlap, 0.5)")
    p.add_argument("--window-batch", type=int, default=None, metavar="N",
                   help="windows per forward pass (default: the checkpoint's finetune.window_batch, 4)")
    p.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation over the axes fine-tuning mirrored (the checkpoint's "
                        "finetune.mirror_axes; z, y and x by default: 8 passes per window)")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default=None, choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on GPU, fp32 on CPU (default: the checkpoint's run.precision)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="window size in voxels (default: the training crop, data.crop_size)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write per-class probability maps (uint8, value / 255) to "
                        "OUT_DIR/probabilities/")
    p.add_argument("--format", default="nii.gz", choices=("nii.gz", "same"),
                   help="output format: nii.gz (default) or same as the input")
    p.set_defaults(func=run)


def output_path(out_dir: Path, source: Path, case: str, fmt: str) -> Path:
    """``OUT_DIR/CASE.<ext>``: NIfTI, or with ``fmt="same"`` the input's image extension."""
    from volumefusion.io import IMAGE_SUFFIXES

    suffix = ".nii.gz"
    if fmt == "same":
        name = source.name.lower()
        suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), ".nii.gz")
    return out_dir / f"{case}{suffix}"


def run(args) -> int:
    import time

    from volumefusion.infer import Predictor
    from volumefusion.io import case_id_from_path, discover_inputs, read_image, write_image
    from volumefusion.log import get_logger

    log = get_logger(__name__)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise VolumeFusionError(f"--overlap {args.overlap}: must be in [0, 1)")
    if args.window_batch is not None and args.window_batch < 1:
        raise VolumeFusionError(f"--window-batch {args.window_batch}: must be >= 1")
    predictor = Predictor.from_checkpoint(
        args.model, args.device, patch_size=args.patch_size, overlap=args.overlap,
        window_batch=args.window_batch, tta=args.tta, precision=args.precision,
    )
    failures: list[tuple[str, str]] = []
    inputs = discover_inputs(args.input, failures)
    out_dir = Path(args.out)
    log.info("%d inputs; %s on %s, patch %s, overlap %g, window batch %d%s", len(inputs),
             predictor.cfg.model.name, predictor.device, list(predictor.patch_size), predictor.overlap,
             predictor.window_batch, ", mirror TTA" if args.tta else "")

    used: dict[str, Path] = {}
    written = 0
    for source in inputs:
        case = case_id_from_path(source)
        if case in used:
            failures.append((str(source), f"case name {case} is already taken by {used[case]}; rename one"))
            continue
        used[case] = source
        started = time.perf_counter()
        try:
            image, geometry = read_image(source)
            labels, probs = predictor.predict(image, geometry, probabilities=args.save_probabilities,
                                              progress=case)
            del image
            write_image(output_path(out_dir, source, case, args.format), labels, geometry)
            for k, channel in enumerate(probs if probs is not None else []):
                write_image(out_dir / "probabilities" / f"{case}_class{k}.nii.gz", channel, geometry)
        except Exception as exc:  # one bad case must not stop the others; it is reported below
            reason = str(exc) if isinstance(exc, VolumeFusionError) else f"{type(exc).__name__}: {exc}"
            failures.append((str(source), reason.splitlines()[0] if reason else type(exc).__name__))
            log.debug("case %s failed", case, exc_info=True)
            continue
        written += 1
        log.info("%s: %s in %.1f s", case, "x".join(map(str, geometry.shape_zyx[::-1])),
                 time.perf_counter() - started)

    print(f"{written} of {written + len(failures)} cases written to {out_dir}")
    for source, reason in failures:
        print(f"  failed: {source}: {reason}")
    return 1 if failures else 0
