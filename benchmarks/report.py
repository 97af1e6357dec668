"""Regenerate BENCHMARKS.md from recorded benchmark JSON files (the output of ``python -m benchmarks``).

Usage (from the repository root)::

    python -m benchmarks.report [FILE.json ...] [--out BENCHMARKS.md] [--notes NOTES.md] [--include-tiny]

Without files it reads ``benchmarks/results/*.json``. The page is ``benchmarks/report_template.md``
with its ``<!-- results -->`` line replaced by one table per machine and its ``<!-- notes -->`` line
by the notes file (default ``benchmarks/results/notes.md``, appended verbatim when it exists).

Files are grouped by machine (the GPU's name for a CUDA run, else the CPU model and core count).
For each machine and benchmark module, the rows come from the newest file holding figures of that
module, so re-running one module (``--only fusion``) replaces just its rows; each row shows its
own date and commit. Failures recorded since then are listed under the table. Each figure is
checked against :data:`TARGETS` (the issues' targets), evaluated here, not at measurement time.
One derived row, :func:`loader_vs_training`, sets the loader's supply against the training step's
demand on the same machine. Tiny-size runs (smoke tests) are left out unless ``--include-tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.run import MODULES

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
TEMPLATE = HERE / "report_template.md"
RESULTS_MARK = "<!-- results -->"
NOTES_MARK = "<!-- notes -->"


@dataclass(frozen=True)
class Target:
    """A figure's goal from the issues: ``figure[field] op threshold`` for matching figures.

    A figure matches when its module and its name fully match the regexes ``benchmark`` and ``name``,
    its device is ``device`` (any when None) and its params contain every item of ``params``.
    """

    benchmark: str
    name: str
    device: str | None
    field: str  # "value" or "ratio"
    op: str  # ">=", "<=", "<"
    threshold: float
    text: str
    params: dict = field(default_factory=dict)

    def matches(self, row: dict) -> bool:
        return (re.fullmatch(self.benchmark, row["benchmark"]) is not None
                and re.fullmatch(self.name, row["name"]) is not None
                and (self.device is None or row["device"] == self.device)
                and all(row["params"].get(k) == v for k, v in self.params.items()))

    def met(self, row: dict) -> bool | None:
        value = row[self.field]
        if value is None:
            return None
        return _OPS[self.op](value, self.threshold)


_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}

# The targets of the issues (3: fusion, 4: store/loader, 5: engine, 6: predict, 9: network, 18: scale).
TARGETS: tuple[Target, ...] = (
    Target("fusion", r"fusion_boxes_samples_per_s", "cuda", "value", ">=", 5000,
           "≥ 5000 samples/s at batch 16 (#3)", {"batch": 16}),
    Target("fusion", r"fusion_grid_cpu_s_per_sample_core", "cpu", "value", "<=", 0.034,
           "≤ 0.034 s: 10× faster than the reference's 0.34 s/sample/core (#3)"),
    Target("store|loader", r".*per_worker.*", None, "value", ">=", 50, "≥ 50 crops/s per worker (#4)"),
    Target("loader ÷ network", r".*", None, "ratio", ">=", 1.5, "≥ 1.5× what training consumes (#4)"),
    Target("network", r"pctnet_paper_train_.*_samples_per_s", "cuda", "value", ">=", 70,
           "≥ 70 samples/s on an H200 (#9)"),
    Target("network", r"pctnet_paper_train_.*_peak_memory_per_sample", "cuda", "value", "<=", 2.5,
           "≤ 2.5 GB/sample on an H200 (#9)"),
    Target("engine", r"engine_overhead_pct", None, "value", "<", 5, "< 5 % over the bare step (#5)"),
    Target("predict", r"predict_.*_vs_monai_fp32", "cuda", "ratio", ">=", 1.5, "≥ 1.5× MONAI (#6)"),
    Target("predict", r"predict_.*_vs_monai_.*", "cpu", "ratio", ">=", 1.0, "not slower than MONAI (#6)"),
    Target("scale", r"open_warm_s", None, "value", "<", 1, "< 1 s at 100k cases (#18)", {"cases": 100_000}),
    Target("scale", r"open_cold_s", None, "value", "<", 3, "< 3 s at 100k cases (#18)", {"cases": 100_000}),
    Target("scale", r"rss_growth_mb", None, "value", "<", 50, "< 50 MB at 100k cases (#18)", {"cases": 100_000}),
    Target("scale", r"open_(cold|warm)_s", None, "value", "<", 10, "< 10 s at 1M cases (#18)",
           {"cases": 1_000_000}),
    Target("scale", r"rss_growth_mb", None, "value", "<", 500, "< 500 MB at 1M cases (#18)",
           {"cases": 1_000_000}),
)

# Each pretraining sample fuses two crops (background and foreground) in the paper's box mode.
CROPS_PER_SAMPLE = 2


def loader_vs_training(loader_rows: list[dict], network_rows: list[dict]) -> dict | None:
    """Derived figure: pretraining samples/s the loader supplies (its most workers) against the fastest
    paper-configuration training step of the network benchmark on the same machine; None without both."""
    loaders = [r for r in loader_rows if r["name"] == "pretrain_loader_crops_per_s"]
    steps = [r for r in network_rows if re.fullmatch(r"pctnet_paper_train_.*_samples_per_s", r["name"])]
    if not loaders or not steps:
        return None
    loader = max(loaders, key=lambda r: r["params"].get("workers", 0))
    step = max(steps, key=lambda r: r["value"])
    supplied = loader["value"] / CROPS_PER_SAMPLE
    return {"benchmark": "loader ÷ network", "name": "pretrain_loader_samples_per_s_vs_training",
            "value": supplied, "unit": "samples/s", "baseline": step["value"],
            "baseline_name": f"training step, {step['name']}", "ratio": supplied / step["value"],
            "higher_is_better": True, "device": loader["device"],
            "params": {"workers": loader["params"].get("workers"), "crops_per_sample": CROPS_PER_SAMPLE}}


def targets_for(row: dict) -> list[Target]:
    return [t for t in TARGETS if t.matches(row)]


def fmt(value: float | None) -> str:
    """A number with about 3 significant digits and thousands separators; '—' for None."""
    if value is None:
        return "—"
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _settings(params: dict) -> str:
    return ", ".join(f"{k}={_compact(v)}" for k, v in params.items())


def machine_key(document: dict) -> str:
    """Which table a run belongs to: the GPU for a CUDA run, else the CPU model and cores."""
    machine = document["machine"]
    if document.get("device") == "cuda" and machine.get("gpu"):
        return machine["gpu"]
    return f"CPU: {machine['cpu']}, {machine['cores']} cores"


def machine_line(document: dict) -> str:
    m, v = document["machine"], document["versions"]
    parts = [f"{m['cpu']}, {m['cores']} cores, {fmt(m['ram_gib'])} GiB RAM, "
             f"load average {fmt(m.get('load_avg_1m'))} at the start"]
    if m.get("gpu"):
        parts.insert(0, f"{m['gpu']} ({fmt(m['gpu_memory_gib'])} GiB, driver {m['gpu_driver']}, "
                        f"CUDA {m['cuda']}, cuDNN {m['cudnn']})")
    parts.append(f"Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, MONAI {v['monai']}")
    return "; ".join(parts)


def _commit(document: dict, module: str | None = None) -> str:
    """The commit a module ran at (recorded per module), else the run's commit at its start."""
    state = next((m for m in document.get("modules", []) if m["benchmark"] == module and "commit" in m),
                 document["versions"])
    commit = state.get("commit") or "unknown"
    return f"{commit} (dirty)" if state.get("dirty") else commit


def load(paths: Sequence[Path], include_tiny: bool) -> list[tuple[Path, dict]]:
    """Read the JSON files, oldest first; tiny-size runs dropped unless asked for."""
    documents = []
    for path in paths:
        document = json.loads(Path(path).read_text())
        for key in ("machine", "versions", "date", "results", "errors"):
            if key not in document:
                raise ValueError(f"{path}: not a benchmark result file (no {key!r}); "
                                 f"write one with python -m benchmarks --out {path}")
        if document.get("tiny") and not include_tiny:
            print(f"[report] {path}: tiny-size run left out (use --include-tiny)", file=sys.stderr)
            continue
        documents.append((Path(path), document))
    return sorted(documents, key=lambda item: item[1]["date"])


def _module_order(name: str) -> int:
    return MODULES.index(name) if name in MODULES else len(MODULES)


def _split_settings(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Settings (device + params) shared by every row, and each row's remaining settings."""
    settings = [{"device": r["device"], **r["params"]} for r in rows]
    common = {k: v for k, v in settings[0].items() if all(k in s and s[k] == v for s in settings)}
    return common, [{k: v for k, v in s.items() if k not in common} for s in settings]


def _verdict(row: dict, goals: list[Target], tiny: bool) -> str:
    if not goals:
        return "—"
    if tiny:
        return "tiny"
    verdicts = [goal.met(row) for goal in goals]
    if None in verdicts:
        return "n/a"
    return "yes" if all(verdicts) else "no"


def _table_row(row: dict, settings: dict, document: dict) -> str:
    baseline = "—" if row["baseline"] is None else f"{fmt(row['baseline'])} ({row['baseline_name']})"
    ratio = "—" if row["ratio"] is None else f"{fmt(row['ratio'])}×"
    goals = targets_for(row)
    return (f"| {row['benchmark']} | {row['name']} | {_settings(settings) or '—'} | {fmt(row['value'])} | "
            f"{row['unit']} | {baseline} | {ratio} | {'; '.join(t.text for t in goals) or '—'} | "
            f"{_verdict(row, goals, document.get('tiny', False))} | {document['date'][:10]} | "
            f"{_commit(document, row['benchmark'])} |")


def machine_section(title: str, documents: list[tuple[Path, dict]]) -> str:
    """One machine's table: per module, the rows of the newest file that has figures of it."""
    newest: dict[str, tuple[Path, dict]] = {}
    for path, document in documents:  # oldest first: later files win
        for module in {r["benchmark"] for r in document["results"]}:
            newest[module] = (path, document)
    lines = [f"### {title}", ""]
    used = sorted({path: document for path, document in newest.values()}.items(), key=lambda i: i[1]["date"])
    for path, document in used:
        tiny = " **tiny sizes: smoke test, not a measurement**" if document.get("tiny") else ""
        lines.append(f"- `{path.name}`: `{document.get('command', 'python -m benchmarks')}` on "
                     f"{document['date']}, commit {_commit(document)}.{tiny} {machine_line(document)}")
    lines += ["", "| benchmark | figure | settings | ours | unit | baseline | ratio | target | met | date "
                  "| commit |", "| --- | --- | --- | ---: | --- | --- | ---: | --- | --- | --- | --- |"]
    shared = []
    chosen: dict[str, list[dict]] = {}
    for module in sorted(newest, key=_module_order):
        _, document = newest[module]
        rows = chosen[module] = [r for r in document["results"] if r["benchmark"] == module]
        common, own = _split_settings(rows)
        shared.append(f"- {module}: {_settings(common)}")
        lines += [_table_row(row, settings, document) for row, settings in zip(rows, own)]
    derived = loader_vs_training(chosen.get("loader", []), chosen.get("network", []))
    if derived is not None:
        settings = {"device": derived["device"], **derived["params"]}
        lines.append(_table_row(derived, settings, newest["loader"][1]))
    if shared:
        lines += ["", "Settings shared by all figures of a benchmark:", *shared]
    failures = []
    for path, document in documents:
        for error in document["errors"]:
            module = error["benchmark"]
            if module not in newest or document["date"] >= newest[module][1]["date"]:
                first_line = error["error"].splitlines()[0] if error["error"] else ""
                failures.append(f"- {module} ({path.name}, {document['date'][:10]}): {first_line}")
    if failures:
        lines += ["", "Failures (newer than or in the run that gave the rows above):", *failures]
    missing = [m for m in MODULES if m not in newest]
    if missing:
        lines += ["", f"Not measured on this machine: {', '.join(missing)}."]
    return "\n".join(lines)


def render(documents: list[tuple[Path, dict]], notes: str | None, template: str) -> str:
    """The whole page: the template with the per-machine tables and the notes filled in."""
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path, document in documents:
        groups.setdefault(machine_key(document), []).append((path, document))
    # CPU tables first, then GPUs, each group in a stable order.
    order = sorted(groups, key=lambda key: (not key.startswith("CPU"), key))
    sections = "\n\n".join(machine_section(key, groups[key]) for key in order)
    if not sections:
        sections = "No results recorded yet."
    return (template.replace(RESULTS_MARK, sections)
            .replace(NOTES_MARK, notes.strip() if notes else "No notes yet.").rstrip() + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0],
        epilog="example: python -m benchmarks.report benchmarks/results/*.json --out BENCHMARKS.md")
    parser.add_argument("files", nargs="*", type=Path,
                        help="result JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--out", type=Path, default=None, help="write the page here (default: stdout)")
    parser.add_argument("--notes", type=Path, default=RESULTS_DIR / "notes.md",
                        help="markdown appended verbatim (default: benchmarks/results/notes.md, if present)")
    parser.add_argument("--include-tiny", action="store_true", help="also show tiny-size smoke-test runs")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    try:
        documents = load(files, args.include_tiny)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        parser.error(str(exc))
    notes = args.notes.read_text() if args.notes.is_file() else None
    page = render(documents, notes, TEMPLATE.read_text())
    if args.out is None:
        sys.stdout.write(page)
    else:
        from volumefusion.files import atomic_write_text

        atomic_write_text(args.out, page)
        print(f"[report] {len(documents)} result files -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
