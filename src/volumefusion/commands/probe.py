"""``volumefusion probe``: did pretraining learn features that serve a labelled task?"""

from __future__ import annotations

import argparse

from volumefusion.commands import add_config_args, positive_int

EXAMPLES = """\
examples:
  # the built-in weights' encoder vs a random one on a labelled set, 2 seeds, 1 labelled case each
  volumefusion probe builtin:demo --data Task01_Phantom/ --out probe_demo -c finetune \\
      --steps 1200 --labelled 1 --seeds 0 1
  # several checkpoints of one pretraining: is the encoder still improving?
  volumefusion probe runs/vf/checkpoints/step_*.pt --data Task09_Spleen/ --out probe_vf --steps 1000
  # also fine-tune every layer from the weights, beside training from scratch
  volumefusion probe runs/vf/checkpoints/latest.pt --data Task09_Spleen/ --out probe_vf --finetune

For each checkpoint and seed one fine-tuning run trains only the decoder, the encoder held still for
the whole budget, and scores the held-out cases (the split's validation cases: mean foreground
Dice, sliding window, after the last step). Beside it, under the same recipe, budget, seed and
cases, the same network with a randomly initialised encoder, held the same way: features worth
having beat it. The table gives every seed, each arm's mean, the mean paired difference with a 95 %
bootstrap interval and a one-sided Wilcoxon signed-rank p (the checkpoint better), written to
OUT/probe.md and OUT/probe.json. The recipe (lr, batch, crop, augmentation) comes from -c/--set as
in finetune; architecture and intensity window from each checkpoint. Rerunning the same command
keeps finished runs; the random arms are shared by checkpoints of one architecture.
"""


def register(sub) -> None:
    p = sub.add_parser("probe", help="frozen-encoder probe: pretrained features vs random ones on a labelled task",
                       description=__doc__.split(":", 1)[1].strip() + "\n\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="+", metavar="CKPT", help="pretrained checkpoints or builtin:NAME")
    p.add_argument("--data", required=True, metavar="DATASET", help="MSD/nnU-Net raw dataset folder or labelled store")
    p.add_argument("--out", required=True, metavar="DIR", help="probe folder (created; rerun to resume)")
    p.add_argument("--steps", type=positive_int, default=1000,
                   help="training steps per run (run.max_steps; default 1000, whatever the recipe says)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="SEED",
                   help="one run per seed and arm; the seed also draws the --labelled cases (default: 0 1)")
    p.add_argument("--labelled", type=positive_int, metavar="N",
                   help="train each run on N of the training cases, drawn by its seed (default: all)")
    p.add_argument("--split", metavar="JSON", help='{"train": [ids], "val": [ids]}; scored on val '
                                                   "(default: fold 0 of the 5-fold split)")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune every layer from each checkpoint, beside training from scratch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=positive_int, help="processes (default: one per CPU core; one on a GPU)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from volumefusion.train.probe import probe

    overrides = [*args.overrides, f"run.max_steps={args.steps}"]
    result = probe(args.weights, args.data, args.out, config=args.config or ["finetune"], overrides=overrides,
                   seeds=args.seeds, labelled=args.labelled, split_file=args.split, finetune_too=args.finetune,
                   device=args.device, workers=args.workers)
    print(result.table())
    print(f"\n{args.out}/probe.md, {args.out}/probe.json")
    return 0
