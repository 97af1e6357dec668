"""The embedded demo (``volumefusion demo``): does Volume Fusion pretraining help fine-tuning?

On procedural CT phantoms (plus the slicerio chest CT), the demo fine-tunes the same small PCT-Net
in three arms that differ only in their starting weights: from scratch, from the built-in Volume
Fusion weights (``builtin:demo``, pretrained once for long; docs/weights.md), and from weights that
the demo pretrains itself for a short while (the live stage that shows pretraining works). It does
so in each label regime (e.g. 1 and 4 labelled training phantoms) for every seed, scores each run on
held-out phantoms, and tests the pre-registered comparison of the settings' ``protocol``.

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
    DIR/runs/<n>labelled/seed<S>/<arm>/       each fine-tuning run (+ predictions/ for the first seed)
    DIR/figures/*.png, DIR/report.md, DIR/report.json
"""

from volumefusion.demo.results import DemoResult, RunResult
from volumefusion.demo.run import run_demo
from volumefusion.demo.settings import ARMS, DemoSettings, load_settings

__all__ = ["ARMS", "DemoResult", "DemoSettings", "RunResult", "load_settings", "run_demo"]
