"""``volumefusion demo``: the whole pipeline on built-in phantoms, with a report."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  volumefusion demo                        # full demo into ./vf-demo (about 9 minutes on 2 CPU cores)
  volumefusion demo --quick --out /tmp/d   # a smoke run of every stage (about 1 minute)
  volumefusion demo --seeds 0 1 2 3 4 --device cuda

Stages: write phantoms (+ the slicerio chest CT when installed) and prepare them; Volume Fusion
pretraining of a small PCT-Net; for each seed, fine-tuning on a few labelled phantoms from the
pretrained weights and from scratch (same config, seed and steps); prediction and evaluation on
held-out phantoms; DIR/report.md with the Dice table, the fusion montage, training curves and
prediction overlays (DIR/figures/). Settings: the bundled preset demo.yaml (`volumefusion config
--presets` shows where; --quick applies its quick section).
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole method on built-in phantoms and write a report",
                       description=__doc__.split(":", 1)[1].strip() + "\n\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "-o", default="vf-demo", metavar="DIR", help="output folder (default ./vf-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="fine-tuning seeds (default: seeds of the settings, 0 1 2; --quick: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--config", "-c", metavar="YAML",
                   help="demo settings: a YAML file or a preset name (default: the bundled preset demo)")
    p.set_defaults(func=run)


def run(args) -> int:
    from volumefusion.demo import run_demo

    result = run_demo(args.out, quick=args.quick, seeds=args.seeds, device=args.device, config=args.config)
    print(f"report: {result.report} ({result.total_seconds:.0f} s)")
    return 0
