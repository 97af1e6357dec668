"""``volumefusion export``: a volumefusion checkpoint in the form another framework fine-tunes from."""

from __future__ import annotations

import argparse

NNUNET_HELP = """\
Write, from a volumefusion checkpoint (PCT-Net, or a network built from an nnU-Net plans file with
model.name nnunet) and the dataset's nnU-Net plans file:
  OUT/volumefusion_<CONFIGURATION>.pth       weights for nnUNetv2_train -pretrained_weights
  OUT/<PLANS_NAME>_volumefusion.json         a plans variant with the configuration to train:
      <CONFIGURATION>_pctnet        PCT-Net (architecture, pooling for deep supervision, patch size
                                    rounded to multiples of its down-sampling)
      <CONFIGURATION>_volumefusion  the plans' own network
    and the CT normalisation of pretraining (HU window -> [-1, 1]) for nnU-Net's CTNormalization.
Exporting a second checkpoint into the same OUT adds its configuration to the plans variant.
Needs the extra: pip install 'volumefusion[nnunet]'.

example (PCT-Net, dataset 501):
  volumefusion export nnunet --checkpoint runs/vf/checkpoints/latest.pt \\
      --plans $nnUNet_preprocessed/Dataset501_X/nnUNetPlans.json --out $nnUNet_preprocessed/Dataset501_X
  nnUNetv2_preprocess -d 501 -plans_name nnUNetPlans_volumefusion -c 3d_fullres_pctnet
  nnUNetv2_train 501 3d_fullres_pctnet 0 -p nnUNetPlans_volumefusion \\
      -pretrained_weights $nnUNet_preprocessed/Dataset501_X/volumefusion_3d_fullres_pctnet.pth

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
    n.add_argument("--out", required=True, metavar="DIR", help="folder for the weights and the plans variant")
    n.set_defaults(func=run_nnunet)


def run_nnunet(args) -> int:
    from volumefusion.integrations.nnunet import export_nnunet

    result = export_nnunet(args.checkpoint, args.plans, args.out, args.configuration)
    print(f"wrote {result.weights}\nwrote {result.plans} (configuration {result.configuration})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"train: nnUNetv2_train DATASET {result.configuration} FOLD -p {result.plans_name} "
          f"-pretrained_weights {result.weights}")
    return 0
