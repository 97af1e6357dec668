"""``volumefusion demo``: does Volume Fusion pretraining help? Measured on built-in phantoms, with a report."""

from __future__ import annotations

import argparse

from volumefusion.commands import positive_int

EXAMPLES = """\
examples:
  volumefusion demo                          # the pre-registered demo into ./vf-demo: under an hour on a
                                             # 2-core CPU (it states its estimate first; stop and rerun
                                             # to resume)
  volumefusion demo --study --out vf-study   # the longer study: probes, positive control, more regimes
                                             # (about 3 h on 2 cores)
  volumefusion demo --quick --out /tmp/d     # a smoke run of every stage (about a minute)
  volumefusion demo --seeds 11 12 13 14 15 16 17 18 --device cuda

The same small PCT-Net is fine-tuned on varied CT phantoms from scratch and from the built-in Volume
Fusion weights (builtin:demo, see docs/weights.md), for each label regime and seed, and every run is
scored on held-out phantoms. Two hypotheses are fixed in the settings before any run and tested with
Holm's correction: (a) with the full label set (8 phantoms) the built-in weights converge faster (the
early readout: mean held-out Dice after 150 and 300 of 1,200 steps; these runs stop at 300), (b) with
1 labelled phantom they score higher at the end of its 600-step budget. --study adds a network pretrained with
labels on other phantoms (the positive control: can the set-up detect transfer at all?), the built-in
or a random encoder held still (probes: are the features any use?), 2 labelled phantoms and the final
readout with 8; --quick also runs weights the demo pretrains itself. DIR/report.md gives the gate
(is the pretext learned on unseen phantoms?), the tests (Wilcoxon signed-rank, 95 % bootstrap
interval), the secondary readouts, every seed, learning curves and predictions; DIR/report.json
every number. Rerun the same command in the same folder to resume (finished runs are kept); a folder
that holds anything else is refused. Settings: the bundled preset demo.yaml (`volumefusion config
--presets` shows where; --study and --quick apply its study and quick sections).
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="measure what Volume Fusion pretraining gains, on built-in phantoms",
                       description=__doc__.split(":", 1)[1].strip() + "\n\n" + EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "-o", default="vf-demo", metavar="DIR", help="output folder (default ./vf-demo)")
    p.add_argument("--study", action="store_true",
                   help="the longer study: positive control, probes, more regimes (the settings' study section)")
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
                      workers=args.workers, study=args.study)
    print(f"report: {result.report} ({result.seconds / 60:.1f} min)")
    return 0
