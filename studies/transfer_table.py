"""The transfer study's table (studies/README.md): every candidate and checkpoint, by seed, from the
runs a `volumefusion probe` folder holds and the candidates' own metrics.

Usage: python studies/transfer_table.py PROBE_DIR RUNS_DIR [SHORTCUT_JSONL] [--json OUT]
Prints a Markdown table: pretext Dice (the run's own validation at that step), probe vs random encoder
and fine-tuning vs scratch (held-out mean Dice, seeds listed), and the shortcut diagnostic when given.
With --json, also writes every run (per-organ Dice), each candidate's pretext per step and the
shortcut records to OUT (the form of docs/study/*.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from volumefusion.train.logging import read_metrics


def results(probe_dir: Path) -> list[dict]:
    """Every finished run's result.json, in a stable order."""
    return [json.loads(done.read_text()) for done in sorted(probe_dir.glob("runs/**/result.json"))]


def runs(probe_dir: Path) -> dict[tuple[str, str], dict[int, float]]:
    """``{(name, arm): {seed: score}}`` of every finished run; the random and scratch arms under ``"-"``."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for r in results(probe_dir):
        name = r["name"] if r["arm"] in ("probe", "finetune") else "-"
        out.setdefault((name, r["arm"]), {})[int(r["seed"])] = float(r["score"])
    return out


def write_json(out: Path, probe_dir: Path, runs_dir: Path, shortcut: Path | None) -> None:
    pretexts = {}
    for run in sorted(p.parent for p in runs_dir.glob("*/metrics.jsonl")):
        pretexts[run.name] = {str(r["step"]): {"score": r["val_score"], **{k: v for k, v in r.items()
                                                                          if k.startswith("val_dice_a")}}
                              for r in read_metrics(run / "metrics.jsonl") if "val_score" in r}
    keep = ("name", "arm", "seed", "score", "dice", "seconds")
    record = {"protocol": "studies/README.md", "probe_dir": str(probe_dir),
              "runs": [{k: r.get(k) for k in keep} for r in results(probe_dir)], "pretext": pretexts,
              "shortcut": [json.loads(line) for line in shortcut.read_text().splitlines()] if shortcut else []}
    out.write_text(json.dumps(record, indent=1) + "\n")


def pretext(runs_dir: Path, name: str) -> str:
    run, _, step = name.partition("/step_")
    if not step:
        return "-"
    records = [r for r in read_metrics(runs_dir / run / "metrics.jsonl") if r.get("step") == int(step)
               and "val_score" in r]
    return f"{records[0]['val_score']:.3f}" if records else "-"


def cell(mine: dict[int, float], base: dict[int, float]) -> str:
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return "-"
    diffs = [mine[s] - base[s] for s in seeds]
    shown = " / ".join(f"{mine[s]:.3f}" for s in seeds)
    wins = sum(d > 0 for d in diffs)
    return f"{np.mean([mine[s] for s in seeds]):.3f} ({shown}); {np.mean(diffs):+.3f}, better on {wins} of {len(seeds)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe_dir", type=Path)
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("shortcut", type=Path, nargs="?")
    parser.add_argument("--json", type=Path, metavar="OUT")
    args = parser.parse_args()
    probe_dir, runs_dir, shortcut = args.probe_dir, args.runs_dir, args.shortcut
    if args.json:
        write_json(args.json, probe_dir, runs_dir, shortcut)
    found = runs(probe_dir)
    random, scratch = found.get(("-", "random"), {}), found.get(("-", "scratch"), {})
    names = sorted({n for n, a in found if n != "-"})
    print(f"random encoder (probe bar): {cell(random, random).split(';')[0]}; scratch: "
          f"{cell(scratch, scratch).split(';')[0]}\n")
    print("| candidate / checkpoint | pretext Dice | probe vs random encoder | fine-tuning vs scratch |")
    print("| --- | ---: | --- | --- |")
    for name in names:
        print(f"| {name} | {pretext(runs_dir, name)} | {cell(found.get((name, 'probe'), {}), random)} | "
              f"{cell(found.get((name, 'finetune'), {}), scratch)} |")
    if shortcut:
        print("\n| fusion recipe | tiny local model's pretext Dice | per level (a0 ... aK) |")
        print("| --- | ---: | --- |")
        for line in shortcut.read_text().splitlines():
            r = json.loads(line)
            levels = " / ".join(f"{v:.2f}" for k, v in r["tiny"].items() if k.startswith("dice_a"))
            print(f"| {r['run']} | {r['tiny']['score']:.3f} | {levels} |")


if __name__ == "__main__":
    main()
