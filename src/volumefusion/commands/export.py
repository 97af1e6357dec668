"""``volumefusion export``: a volumefusion checkpoint in the form another framework fine-tunes from."""

from __future__ import annotations

import argparse

NNUNET_HELP = """\
Write, from a volumefusion checkpoint (PCT-Net, or a network built from an nnU-Net plans file with
model.name nnunet) and the dataset's nnU-Net plans file:
  OUT/VARIANT.json          a plans variant (VARIANT: PLANS_NAME_volumefusion, or --plans-name) with
                            the configuration to train (NAME, or --name):
      CONFIGURATION_pctnet        PCT-Net (architecture, pooling for deep supervision, patch size
                                  rounded to multiples of its down-sampling)
      CONFIGURATION_volumefusion  the plans' own network
    and the CT normalisation of pretraining (HU window -> [-1, 1]) for nnU-Net's CTNormalization;
  OUT/VARIANT_NAME.pth      weights for nnUNetv2_train -pretrained_weights.
Exporting a second checkpoint into the same OUT adds its configuration to the plans variant; one of
another HU window needs a variant of its own (--plans-name). An earlier export of the same
configuration is replaced only with --force, which keeps the configuration's batch_size (hand edits);
--name exports beside it. Both files are written completely or not at all.
Needs the extra: pip install 'volumefusion[nnunet]'. nnUNetv2_train -tr with a trainer other than
the default also needs a torchvision built for the installed torch (the export says when it is not).

example (PCT-Net, dataset 501):
  volumefusion export nnunet --checkpoint runs/vf/checkpoints/latest.pt \\
      --plans $nnUNet_preprocessed/Dataset501_X/nnUNetPlans.json --out $nnUNet_preprocessed/Dataset501_X
  nnUNetv2_preprocess -d 501 -plans_name nnUNetPlans_volumefusion -c 3d_fullres_pctnet
  nnUNetv2_train 501 3d_fullres_pctnet 0 -p nnUNetPlans_volumefusion \\
      -pretrained_weights $nnUNet_preprocessed/Dataset501_X/nnUNetPlans_volumefusion_3d_fullres_pctnet.pth

An official MIS-FM checkpoint needs `volumefusion convert` first. A checkpoint the plans cannot hold
(several input channels, a network from other plans, model.name unet) is refused with what to change.
"""


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint for fine-tuning in another framework (nnU-Net)",
                       description="Export a volumefusion checkpoint for fine-tuning in another framework.")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    n = targets.add_parser("nnunet", help="weights and a plans variant for nnU-Net v2",
                           description=NNUNET_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    n.add_argument("--checkpoint", required=True, metavar="CKPT", help="volumefusion checkpoint (.pt)")
    n.add_argument("--plans", required=True, metavar="PLANS.json",
                   help="the dataset's nnU-Net plans file (nnUNetPlans.json, nnUNetResEncUNetLPlans.json, ...)")
    n.add_argument("--configuration", default="3d_fullres",
                   help="the plans' configuration to start from (default: %(default)s)")
    n.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the weights and the plans variant: the dataset's folder in nnUNet_preprocessed, "
                        "where nnU-Net looks for plans")
    n.add_argument("--plans-name", metavar="NAME",
                   help="name of the plans variant, for nnUNetv2_train -p (default: PLANS_NAME_volumefusion)")
    n.add_argument("--name", metavar="NAME",
                   help="name of the new configuration (default: CONFIGURATION_pctnet or CONFIGURATION_volumefusion)")
    n.add_argument("--force", action="store_true",
                   help="replace an earlier export of the same configuration (its batch_size is kept)")
    n.set_defaults(func=run_nnunet)


def run_nnunet(args) -> int:
    from volumefusion.integrations.nnunet import export_nnunet

    result = export_nnunet(args.checkpoint, args.plans, args.out, args.configuration,
                           plans_name=args.plans_name, name=args.name, force=args.force)
    print(f"wrote {result.weights}\nwrote {result.plans} (configuration {result.configuration})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"train: nnUNetv2_train DATASET {result.configuration} FOLD -p {result.plans_name} "
          f"-pretrained_weights {result.weights}")
    return 0
