"""``volumefusion prepare``: turn a CT collection into a store of chunked int16 arrays."""

from __future__ import annotations

import argparse
import math

from volumefusion.commands import positive_int

DESCRIPTION = """\
Prepare CT volumes once for fast training: each case is reoriented to one orientation (LPS),
optionally resampled, cropped to the body (HU > -600, largest component) and stored as int16 HU
(labels uint8) in chunks that a [64,128,128] crop reads without decompressing the whole case.
Everything needed to map results back onto the original image grid is recorded per case.

INPUT may be any mix of:
  image files        .nii .nii.gz .nrrd .nhdr .mha .mhd
  folders            searched recursively for those files and for DICOM series folders
  DICOM series       a folder; with several series in it, pick one as 'FOLDER::SERIES_UID'
  glob patterns      quote them: 'data/*/ct.nii.gz' ('**' recurses)
  lists              a .txt (one path per line) or .csv (column 'image' or 'path', or the first);
                     relative paths in a list are relative to the list's own folder
  datasets           an MSD or nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr):
                     its training cases are prepared with their labels; label names are kept
Case ids are file names without suffixes (a DICOM folder's name); files sharing a name get their
folder path as a prefix. Label maps given with --labels (not a dataset) have their classes named
label_1, label_2, ... (0 is background) in the store.

Safe to interrupt (Ctrl-C: exit status 130, SIGTERM: 143) and re-run: finished cases are skipped
(unless their image or label file changed since: size or modification time; or another --channel
is asked for), every file is written under a temporary name and renamed, and a case counts as
finished only once its record cases/<id>.json exists. STORE must be a new or empty folder, or a store.
Bad inputs (unreadable, 2D, 4D without --channel, NaN, label grid mismatch, undeclared label values,
duplicate ids) are reported, skipped and listed at the end; the exit status is 1 if any failed.
Suspicious values (HU beyond int16, no air, a constant image, spacing outside 0.2..10 mm) are
prepared anyway and listed at the end as warnings. Without a terminal, one line is logged per case.

examples:
  volumefusion prepare /data/ct/ --out store/
  volumefusion prepare 'scans/**/*.nii.gz' dicom_list.txt --out store/ --workers 8
  volumefusion prepare Task09_Spleen/ --out spleen_store/ --spacing 2 0.8 0.8
  volumefusion prepare images/ --labels labels/ --out store/      # labels matched by case id

  # a SLURM job array of 16 tasks filling one store (each task prepares disjoint cases):
  #   sbatch --array=0-15 --wrap 'volumefusion prepare /data/ct --out /scratch/store \\
  #          --shard $SLURM_ARRAY_TASK_ID/16 --workers $SLURM_CPUS_PER_TASK'
  volumefusion prepare --reindex /scratch/store   # after editing or deleting cases/*.json by hand

The store's index (STORE/cases.index) holds what training needs of every case in one file, so a
store of 100k cases opens in a second on every GPU process and loader worker. Every run and every
shard merges its cases into it when it ends (shards ending together take turns); training rebuilds
it when it is missing or older than cases/ (a warning says so). --reindex brings it up to date now.
"""


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 <= i < n, e.g. 0/4 .. 3/4")
    return index, count


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of mm") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: spacing must be a positive, finite number of mm")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "prepare", help="raw CT (NIfTI/NRRD/MHA/DICOM, datasets) -> chunked int16 store",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="images, folders, globs, lists or datasets")
    p.add_argument("--out", "-o", metavar="STORE",
                   help="store folder: new, empty, or an existing store to add cases to (required)")
    p.add_argument("--reindex", metavar="STORE",
                   help="only bring STORE's case index up to date with its records (re-reads the records "
                        "that changed), then exit; takes no INPUT")
    p.add_argument("--spacing", nargs=3, type=_positive_float, metavar=("Z", "Y", "X"),
                   help="resample to this voxel spacing in mm (default: keep each image's spacing)")
    p.add_argument("--no-crop", action="store_true", help="store the whole volume, not just the body box")
    p.add_argument("--body-threshold", type=float, metavar="HU",
                   help="HU above which a voxel is body, for the body box (default: -600)")
    p.add_argument("--workers", "-j", type=positive_int, default=1, metavar="N",
                   help="parallel worker processes (default: 1; each holds a few copies of one volume)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n",
                   help="prepare only shard i of n (0-based; a stable hash of the case id decides), so n "
                        "jobs fill one store with disjoint cases")
    p.add_argument("--channel", type=int, metavar="K",
                   help="for 4D / multi-component images or multi-channel datasets: use channel K (0-based)")
    p.add_argument("--labels", metavar="DIR",
                   help="folder of label maps, matched to images by case id (CASE_0000 matches CASE)")
    p.set_defaults(func=run)


def run(args) -> int:
    import signal
    import sys
    import time

    from volumefusion import VolumeFusionError
    from volumefusion.data.prepare import prepare
    from volumefusion.data.store import reindex
    from volumefusion.preprocess import PrepareSettings

    if args.reindex is not None:
        if args.inputs or args.out:
            raise VolumeFusionError("--reindex STORE takes no INPUT and no --out")
        start = time.perf_counter()
        index = reindex(args.reindex)
        what = f"{index.reread} record(s) read again (changed since the last index)" if index.reread else \
            "no record changed"
        print(f"{args.reindex}: index of {len(index)} cases brought up to date: {what} "
              f"({time.perf_counter() - start:.1f} s)")
        return 0
    if not args.inputs or args.out is None:
        raise VolumeFusionError("give the INPUT images and --out STORE (or --reindex STORE)")

    settings = PrepareSettings(
        spacing_zyx=tuple(args.spacing) if args.spacing else None,
        crop_to_body=not args.no_crop,
        **({} if args.body_threshold is None else {"body_threshold": args.body_threshold}),
    )
    terminated = []

    def on_sigterm(signum, frame):
        # Job runners, `timeout` and SLURM stop with SIGTERM: stop as for Ctrl-C, so the worker pool
        # is shut down instead of left running without its parent.
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        summary = prepare(args.inputs, args.out, settings, workers=args.workers, shard=args.shard,
                          channel=args.channel, label_dir=args.labels)
    except KeyboardInterrupt:
        if not terminated:
            raise
        print("volumefusion prepare: terminated; re-run to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.format())
    return 0 if summary.ok else 1
