"""Round three's early readout, chosen on development phantoms and seeds (studies/README.md).

Runs the demo's regime of 8 labelled phantoms (scratch and built-in, development offset 50000,
seeds 101-106), each run stopped at step 300 of its 1,200-step schedule and scored on the 8 held-out
development phantoms every 25 steps; then prints each candidate readout (the mean of the held-out
Dice at k evenly spaced steps up to 300) with the paired differences per seed as JSON.

    python studies/readout.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from volumefusion.config import merge, read_yaml, resolve_path
from volumefusion.demo import run_demo

DEV = {
    "phantoms": {"seed_offset": 50000, "gate": 1},
    "protocol": {"seeds": [101, 102, 103, 104, 105, 106], "labelled": [8], "steps": [1200], "primary_final": 0,
                 "early_points": 12, "stop_early": [8], "gate_samples": 4},
}
CANDIDATES = (1, 2, 4, 6, 12)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = merge(read_yaml(resolve_path("demo")), DEV)
    for mode in ("study", "quick"):
        settings.pop(mode, None)
    (out / "settings.json").write_text(json.dumps(settings, indent=1))  # JSON is YAML
    run_demo(out / "demo", config=out / "settings.json", device="cpu")
    runs = json.loads((out / "demo" / "report.json").read_text())["runs"]
    curves = {(r["seed"], r["arm"]): {int(k): v for k, v in r["early_curve"].items()} for r in runs}
    seeds = sorted({s for s, _ in curves})
    table = {}
    for k in CANDIDATES:
        steps = [round(300 * i / k) for i in range(1, k + 1)]
        diff = [np.mean([curves[s, "builtin"][t] for t in steps]) - np.mean([curves[s, "scratch"][t] for t in steps])
                for s in seeds]
        table[k] = {"steps": steps, "differences": [round(d, 4) for d in diff], "mean": round(float(np.mean(diff)), 4),
                    "sd": round(float(np.std(diff, ddof=1)), 4),
                    "mean_over_sd": round(float(np.mean(diff) / np.std(diff, ddof=1)), 3)}
    print(json.dumps({"seeds": seeds, "curves": {f"{s} {a}": c for (s, a), c in curves.items()},
                      "candidates": table}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
