"""``volumefusion pretrain``: Volume Fusion self-supervised pretraining."""

from __future__ import annotations

import argparse

from volumefusion.commands import add_training_args, training_overrides

EXAMPLES = """\
examples:
  # the paper's schedule on one GPU (400k steps, batch 4, [64,128,128] crops)
  volumefusion pretrain -c pretrain_paper --data store/ --out runs/vf
  # 8 GPUs on one node; global batch = 8 x --batch-size
  torchrun --nproc_per_node=8 -m volumefusion pretrain -c pretrain_paper \\
      --data store/ --out runs/vf --batch-size 4
  # a short CPU try-out with a small network
  volumefusion pretrain --data store/ --out runs/try --device cpu --max-steps 50 \\
      --set model.feature_channels=[8,16,32,64,128] --set model.num_heads=[2,4,8] --set data.crop_size=[32,64,64]
  # probe the features every 2000 steps: the decoder trained on 2 labelled cases of a small labelled
  # set with the encoder frozen, beside a random encoder (probe_score / probe_random in progress.png)
  volumefusion pretrain -c pretrain_paper --data store/ --out runs/vf --set probe.every=2000 \
      --set probe.data=Task09_Spleen/ --set probe.labelled=2 --set probe.seeds=[0,1]
  # continue an interrupted run (the same command plus --resume)
  volumefusion pretrain -c pretrain_paper --data store/ --out runs/vf --resume

The run folder gets config.yaml (the resolved config), metrics.jsonl, progress.png, images/,
tensorboard/ (when installed) and checkpoints/ (latest.pt, best.pt, step_*.pt). SIGTERM or Ctrl-C
writes latest.pt and exits with status 143 (130 for Ctrl-C); rerun with --resume to continue from
that step. A new run refuses a folder that already holds checkpoints, and --resume refuses changed
settings other than run length, reporting, device and workers.
"""


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="Volume Fusion self-supervised pretraining on a prepared store",
                       description=__doc__.split(":", 1)[1].strip() + "\n\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="STORE", help="store written by `volumefusion prepare`")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created)")
    add_training_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from volumefusion import config
    from volumefusion.train.probe import probe_hook
    from volumefusion.train.runs import pretrain

    cfg = config.load(args.config, training_overrides(args))
    return pretrain(cfg, args.data, args.out, resume=args.resume, on_checkpoint=probe_hook(cfg, args.out)).exit_status
