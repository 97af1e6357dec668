"""``volumefusion convert``: turn an official MIS-FM PCT-Net checkpoint into a volumefusion checkpoint."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="turn a MIS-FM PCT-Net checkpoint into a volumefusion checkpoint",
        description="Read a MIS-FM / PyMIC PCT-Net checkpoint ({'model_state_dict': ...}), infer its "
                    "architecture, map its weights onto volumefusion's PCT-Net (checking every used tensor "
                    "fits) and write a self-describing checkpoint that finetune --pretrained and predict "
                    "accept. The reference relative-position index is kept, so outputs are unchanged.\n\n"
                    "example: volumefusion convert pctnet_ct10k_volf.pt --out pctnet_volf.pt "
                    "--safetensors pctnet_volf.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="MISFM_CKPT", help="MIS-FM PCT-Net checkpoint (.pt)")
    p.add_argument("--out", required=True, metavar="OURS.pt", help="volumefusion checkpoint to write")
    p.add_argument("--safetensors", metavar="OUT.safetensors", help="also export the weights as safetensors")
    p.add_argument("--resolution-mode", type=int, choices=(0, 1, 2), default=None,
                   help="resolution mode the weights were trained with, when it cannot be read from them "
                        "(default: inferred; the paper's 1 if unknown)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.FIELD=VALUE",
                   help="correct an inferred model field the weights cannot show, e.g. --set "
                        "model.shifted_windows=[true,true,false] (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from volumefusion import VolumeFusionError
    from volumefusion.checkpoint import read_checkpoint, write_safetensors, write_weights
    from volumefusion.files import check_writable_file
    from volumefusion.weights import model_from_misfm

    check_writable_file(args.out, "--out")
    if args.safetensors:
        check_writable_file(args.safetensors, "--safetensors")
    ckpt = read_checkpoint(args.checkpoint, expected="a MIS-FM / PyMIC PCT-Net checkpoint (.pt)")
    if ckpt.layout == "volumefusion":
        raise ckpt.error(f"{ckpt.kind}, which needs no conversion")
    if ckpt.layout != "misfm":
        raise ckpt.error(f"not a MIS-FM PCT-Net state dict ({ckpt.kind}); convert reads MIS-FM / PyMIC PCT-Net "
                         "checkpoints")
    if any(not o.startswith("model.") for o in args.overrides):
        raise VolumeFusionError("convert --set changes model fields only (model.FIELD=VALUE)")
    model, cfg, num_classes, report = model_from_misfm(ckpt, args.overrides, args.resolution_mode,
                                                       partial=None)  # checked below
    print(report.format())
    if report.missing or report.shape_skipped or report.adapted:
        bad = len(report.missing) + len(report.shape_skipped)
        raise VolumeFusionError(f"{args.checkpoint}: {bad} tensors of the inferred architecture are "
                                "missing or mis-shaped; not converted")
    weights = model.state_dict()
    task = {"kind": "pretrain", "num_classes": num_classes, "label_names": None, "preprocessing": {}}
    write_weights(args.out, weights, cfg.to_dict(), task, step=ckpt.step or 0)
    print(f"wrote {args.out}")
    if args.safetensors:
        write_safetensors(args.safetensors, weights, cfg.to_dict(), task)
        print(f"wrote {args.safetensors}")
    return 0
