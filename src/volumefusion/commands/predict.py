"""``volumefusion predict``: segment CT images with a fine-tuned checkpoint."""

from __future__ import annotations

import argparse

from volumefusion import VolumeFusionError
from volumefusion.config import MAX_OVERLAP

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
                        "folders (folder::SERIES_UID picks one series), globs or .txt/.csv lists (relative paths in a "
                        "list are relative to the list's folder)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--overlap", type=float, default=None,
                   help="share of a window overlapping its neighbour, [0, 0.95] (default: the checkpoint's "
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


def run(args) -> int:
    from volumefusion.infer import predict_files

    if args.overlap is not None and not 0 <= args.overlap <= MAX_OVERLAP:
        raise VolumeFusionError(f"--overlap {args.overlap}: must be in [0, {MAX_OVERLAP}], as finetune.overlap")
    if args.window_batch is not None and args.window_batch < 1:
        raise VolumeFusionError(f"--window-batch {args.window_batch}: must be >= 1")
    summary = predict_files(
        args.model, args.input, args.out, device=args.device, patch_size=args.patch_size, overlap=args.overlap,
        window_batch=args.window_batch, tta=args.tta, precision=args.precision,
        save_probabilities=args.save_probabilities, fmt=args.format, channel=args.channel,
    )
    print(summary.format())
    return 1 if summary.failed else 0
