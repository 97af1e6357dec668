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
  CASE is the input file name without extension (a DICOM folder's name); inputs sharing a name
  get their folder path as a prefix, as in prepare. With --format same the input's format is kept
  (DICOM series are written as NIfTI). An OUT_DIR where an output would replace an input is refused.

memory: windows run slab by slab along z and only labels are kept for the whole volume: a
512x512x600 CT with the paper PCT-Net and window batch 4 peaks at about 6.5 GB of RAM on CPU
(--window-batch 1 saves about 3 GB). --save-probabilities adds about 3 bytes per voxel and class.
OUT_DIR is checked before the model is loaded. A case that fails is reported and skipped; the exit
status is 1 if any case failed. Suspicious values (HU beyond int16, no air, a constant image, a
spacing outside 0.2..10 mm) are warned about and listed at the end."""


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
    p.add_argument("--channel", type=int, metavar="K",
                   help="for 4D / multi-component images: segment channel K (0-based), the one the model "
                        "was fine-tuned on")
    p.set_defaults(func=run)


def output_path(out_dir: Path, source: Path, case: str, fmt: str) -> Path:
    """``OUT_DIR/CASE.<ext>``: NIfTI, or with ``fmt="same"`` the input's image extension."""
    from volumefusion.io import IMAGE_SUFFIXES

    suffix = ".nii.gz"
    if fmt == "same":
        name = source.name.lower()
        suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), ".nii.gz")
    return out_dir / f"{case}{suffix}"


def check_outputs_spare_inputs(inputs: list[Path], outputs: list[Path]) -> None:
    """VolumeFusionError if any output path is one of the input files (``-o`` = ``-i`` folder)."""
    from volumefusion.io import SERIES_SEPARATOR, resolved

    sources = {resolved(str(p).split(SERIES_SEPARATOR)[0]) for p in inputs}
    clash = [p for p in outputs if resolved(p) in sources]
    if clash:
        raise VolumeFusionError(f"{clash[0]}: the output would overwrite this input image "
                                f"({len(clash)} in all); pass another -o folder")


def run(args) -> int:
    import time

    from volumefusion.data.prepare import CaseTask, unique_case_ids
    from volumefusion.infer import Predictor
    from volumefusion.io import case_id_from_path, check_writable_folder, discover_inputs, read_image, write_image
    from volumefusion.log import get_logger
    from volumefusion.preprocess import suspicious_values

    log = get_logger(__name__)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise VolumeFusionError(f"--overlap {args.overlap}: must be in [0, 1)")
    if args.window_batch is not None and args.window_batch < 1:
        raise VolumeFusionError(f"--window-batch {args.window_batch}: must be >= 1")
    failures: list[tuple[str, str]] = []  # (input, reason naming the input)
    inputs = discover_inputs(args.input, failures)
    cases = unique_case_ids([CaseTask(case_id_from_path(p), str(p)) for p in inputs], failures)
    out_dir = Path(args.out)
    outputs = {c.case_id: output_path(out_dir, Path(c.image), c.case_id, args.format) for c in cases}
    check_outputs_spare_inputs(inputs, list(outputs.values()))
    # before the model is loaded and any case segmented: a run must not end in unwritable outputs
    check_writable_folder(out_dir, "-o")
    if args.save_probabilities:
        check_writable_folder(out_dir / "probabilities", "-o")
    folders = [p for p in outputs.values() if p.is_dir()]
    if folders:
        raise VolumeFusionError(f"{folders[0]}: a folder has the name of this output ({len(folders)} in all); "
                                "move it, or pass another -o folder")
    predictor = Predictor.from_checkpoint(
        args.model, args.device, patch_size=args.patch_size, overlap=args.overlap,
        window_batch=args.window_batch, tta=args.tta, precision=args.precision,
    )
    log.info("%d inputs; %s on %s, patch %s, overlap %g, window batch %d%s", len(inputs),
             predictor.cfg.model.name, predictor.device, list(predictor.patch_size), predictor.overlap,
             predictor.window_batch, ", mirror TTA" if args.tta else "")

    written = 0
    warnings: list[str] = []  # suspicious values of cases segmented anyway, naming the input
    for task in cases:
        source, case = task.image, task.case_id
        started = time.perf_counter()
        try:
            image, geometry = read_image(source, channel=args.channel)
            for warning in suspicious_values(image, geometry.spacing_zyx):
                warnings.append(f"{source}: {warning}")
                log.warning("%s", warnings[-1])
            labels, probs = predictor.predict(image, geometry, probabilities=args.save_probabilities,
                                              progress=case)
            del image
            try:
                write_image(outputs[case], labels, geometry)
                for k, channel in enumerate(probs if probs is not None else []):
                    write_image(out_dir / "probabilities" / f"{case}_class{k}.nii.gz", channel, geometry)
            except OSError as exc:  # a full disk: this case's outputs are not written (atomic writes)
                raise VolumeFusionError(f"{exc.filename}: cannot write ({exc.strerror})") from None
        except Exception as exc:  # one bad case must not stop the others; it is reported below
            reason = str(exc) if isinstance(exc, VolumeFusionError) else f"{type(exc).__name__}: {exc}"
            reason = reason.splitlines()[0] if reason else type(exc).__name__
            failures.append((source, reason if source in reason else f"{source}: {reason}"))
            log.debug("case %s failed", case, exc_info=True)
            continue
        written += 1
        log.info("%s: %s in %.1f s", case, "x".join(map(str, geometry.shape_zyx[::-1])),
                 time.perf_counter() - started)

    print(f"{written} of {written + len(failures)} cases written to {out_dir}")
    for _, reason in failures:
        print(f"  failed: {reason}")
    for warning in warnings:
        print(f"  warning: {warning}")
    return 1 if failures else 0
