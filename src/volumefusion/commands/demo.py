"""``volumefusion demo``: does Volume Fusion pretraining help? Measured on built-in phantoms, with a report."""

from __future__ import annotations

import argparse

from volumefusion.commands import positive_int

EXAMPLES = """\
examples:
  volumefusion demo                          # full demo into ./vf-demo: hours on a 2-core CPU (it states
                                             # its estimate first; stop and rerun to resume)
  volumefusion demo --quick --out /tmp/d     # a smoke run of every stage (about 2 minutes)
  volumefusion demo --seeds 11 12 13 14 15 16 --device cuda

The same small PCT-Net is fine-tuned on varied CT phantoms in arms that differ in their starting
weights: from scratch, from the built-in Volume Fusion weights (builtin:demo, see docs/weights.md),
from a network pretrained with labels on other phantoms (positive control), and with the built-in or
a random encoder held still (probes); the quick run adds weights pretrained by the demo itself. For
each label regime and seed, every run is scored on held-out phantoms. DIR/report.md first checks the
preconditions (gate: is the pretext learned on unseen phantoms? headroom: do more labels help from
scratch?), then gives the pre-registered paired test (Wilcoxon signed-rank and a 95 % bootstrap
interval), the secondary readouts, every seed, learning curves and predictions; DIR/report.json every
number. Rerun the same command in the same folder to resume an interrupted demo (finished runs are
kept); a folder that holds anything else is refused. Settings: the bundled preset demo.yaml
(`volumefusion config --presets` shows where; --quick applies its quick section).
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="measure what Volume Fusion pretraining gains, on built-in phantoms",
                       description=__doc__.split(":", 1)[1].strip() + "\n\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "-o", default="vf-demo", metavar="DIR", help="output folder (default ./vf-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="fine-tuning seeds, replacing protocol.seeds of the settings")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="processes running at once, 1 or more (default: one per CPU core, each with one torch "
                        "thread; one on a GPU)")
    p.add_argument("--config", "-c", metavar="YAML",
                   help="demo settings: a YAML file or a preset name (default: the bundled preset demo)")
    p.set_defaults(func=run)


def run(args) -> int:
    from volumefusion.demo import run_demo

    result = run_demo(args.out, quick=args.quick, seeds=args.seeds, device=args.device, config=args.config,
                      workers=args.workers)
    print(f"report: {result.report} ({result.seconds / 60:.1f} min)")
    return 0
