"""The embedded demo (``volumefusion demo``): does Volume Fusion pretraining help fine-tuning?

On procedural CT phantoms, the demo fine-tunes the same small PCT-Net in arms that differ only in
their starting weights (and the recipe that goes with them): from scratch and from the built-in
Volume Fusion weights (``builtin:demo``; docs/weights.md), for every label regime and seed, scores
each run on held-out phantoms, and tests the pre-registered hypotheses of the settings' ``protocol``
(Holm's correction across them): faster convergence with the full label set (the early readout) and
a gain with one labelled phantom (the final readout). ``--study`` adds the positive control (weights
pretrained with labels on other phantoms), the frozen-encoder probes (built-in vs random encoder) and
more regimes; ``--quick`` also runs weights the demo pretrains itself (the live stage).

Modules: :mod:`~volumefusion.demo.settings` (typed settings, bundled preset ``demo.yaml``),
:mod:`~volumefusion.demo.data` (phantoms and splits), :mod:`~volumefusion.demo.run` (the runs and
their scheduling over processes), :mod:`~volumefusion.stats` (paired bootstrap interval and
Wilcoxon test), :mod:`~volumefusion.demo.report` (``report.md``, ``report.json``, figures).

Output layout::

    DIR/data/pool/, DIR/data/pool_store/      the live pretraining's unlabelled pool
    DIR/data/Task01_Phantom/                  labelled phantoms (MSD layout); split_<n>labelled.json
    DIR/data/test/{images,labels}/            held-out phantoms
    DIR/configs/{pretrain,finetune}.yaml      resolved configs, usable with the ordinary commands
    DIR/runs/pretrain/                        the live pretraining
    DIR/runs/<n>labelled/seed<S>/<arm>/       each fine-tuning run: predictions/ and metrics.csv of its
                                              final weights, early/step<N>/ of each early readout
    DIR/figures/*.png, DIR/report.md, DIR/report.json
"""

from volumefusion.demo.results import DemoResult, RunResult
from volumefusion.demo.run import run_demo
from volumefusion.demo.settings import ARMS, DemoSettings, load_settings

__all__ = ["ARMS", "DemoResult", "DemoSettings", "RunResult", "load_settings", "run_demo"]
