"""``volumefusion finetune``: train a segmentation network, from pretrained weights or from scratch."""

from __future__ import annotations

import argparse

from volumefusion.commands import add_training_args, training_overrides

EXAMPLES = """\
examples:
  # fine-tune VF-pretrained weights on an MSD task, fold 0 of 5
  volumefusion finetune --data Task09_Spleen/ --pretrained runs/vf/checkpoints/latest.pt \\
      --out runs/spleen_vf -c finetune --fold 0
  # the same budget from scratch: the fair comparison
  volumefusion finetune --data Task09_Spleen/ --pretrained none --out runs/spleen_scratch -c finetune
  # the official MIS-FM weights (PyMIC checkpoint) work directly
  volumefusion finetune --data Task09_Spleen/ --pretrained pctnet_ct10k_volf.pt --out runs/spleen_misfm
  # the small PCT-Net shipped with the package (the demo's network; docs/weights.md)
  volumefusion finetune --data Task01_Phantom/ --pretrained builtin:demo --out runs/phantom_builtin

DATASET is an MSD / nnU-Net raw folder (dataset.json, imagesTr, labelsTr), prepared into
RUN_DIR/store with the pretrained model's preparation settings, or a labelled store from
`volumefusion prepare`. Architecture and intensity window come from the pretrained checkpoint; only
the class-dependent output layers start fresh (the load report says what was loaded); any other
tensor that does not load is an error before any work starts, unless named with --partial-load. Validation
runs sliding-window inference on whole validation cases every run.val_every steps; best.pt keeps the
best mean foreground Dice. Splits: 5-fold by case with a fixed seed (--fold), or --split FILE.
A config that changes the pretrained architecture is an error (dropout, drop_path and
deep_supervision may change). SIGTERM or Ctrl-C writes latest.pt and exits with status 143 / 130;
the same command plus --resume continues.
"""


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune on a labelled dataset (or train from scratch)",
                       description=__doc__.split(":", 1)[1].strip() + "\n\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DATASET", help="MSD/nnU-Net raw dataset folder or labelled store")
    p.add_argument("--pretrained", required=True, metavar="CKPT|builtin:NAME|none",
                   help="volumefusion or MIS-FM checkpoint, builtin:demo (weights shipped with the package), "
                        "or 'none' to train from scratch")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created)")
    p.add_argument("--fold", type=int, help="validation fold of the k-fold split (finetune.fold)")
    p.add_argument("--split", metavar="JSON", help='{"train": [ids], "val": [ids]} (finetune.split_file)')
    p.add_argument("--partial-load", nargs="+", metavar="NAME",
                   help="let these pretrained tensors (names or module paths, e.g. stem.proj) start untrained "
                        "when the checkpoint's do not fit; without it any tensor outside the output layers that "
                        "does not load is an error (finetune.partial_load)")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from volumefusion.train.runs import finetune

    overrides = training_overrides(args)
    if args.fold is not None:
        overrides.append(f"finetune.fold={args.fold}")
    if args.split:
        overrides.append(f"finetune.split_file={args.split}")
    if args.partial_load:
        overrides.append(f"finetune.partial_load={json.dumps(args.partial_load)}")
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    result = finetune(args.config, overrides, args.data, args.out, pretrained, resume=args.resume)
    if result.load_report is not None:
        print(result.load_report.format())
    return result.exit_status
