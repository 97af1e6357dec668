"""Run every benchmark and print one JSON document: machine, versions and each figure with its baseline.

Usage (from the repository root)::

    python -m benchmarks [--tiny] [--device auto|cpu|cuda] [--only fusion,loader] [--out results.json]

Each module ``benchmarks/<name>.py`` of :data:`MODULES` exposes ``run(tiny, device) -> list[dict]``
(keys in :data:`RESULT_KEYS`). A module that does not exist yet is reported as ``missing`` and
skipped; a module that raises, or returns a malformed figure, becomes an entry of ``errors`` and
the others still run. Progress goes to stderr; stdout carries only the JSON document. With
``--out`` the document is also written after every module (``"complete": false`` until the last),
so a run cut short by a timeout keeps what finished.

Exit status: 0 when every present module ran and returned well-formed figures, 1 otherwise,
2 for bad arguments (an unknown module, ``--device cuda`` without a CUDA device).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import numbers
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

MODULES = ("fusion", "store", "loader", "network", "compile", "engine", "predict", "nnunet", "scale")
CPU_ONLY = ("loader", "store", "scale")
"""Modules that measure the host alone (no device): ``gpu_check.sh`` leaves them out by default."""
OWN_STEP = ("compile", "nnunet")
"""Modules that ``gpu_check.sh`` runs in a step of their own, with their own time limit."""

# Every figure a module returns has exactly these keys with these types (None where allowed);
# numbers.Real admits numpy scalars, which the JSON writer turns into plain numbers.
RESULT_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "value": (numbers.Real,),
    "unit": (str,),
    "baseline": (numbers.Real, type(None)),
    "baseline_name": (str, type(None)),
    "ratio": (numbers.Real, type(None)),
    "higher_is_better": (bool,),
    "device": (str,),
    "params": (dict,),
}

# Modules round their figures (often to 3 decimals): a ratio this close to value/baseline counts as equal.
RATIO_REL_TOL = 1e-2
RATIO_ABS_TOL = 1e-3

REPO_ROOT = Path(__file__).resolve().parents[1]


def expected_ratio(value: float, baseline: float | None, higher_is_better: bool) -> float | None:
    """How many times better ours is than the baseline (> 1: ours is better), or None without one.

    ``value / baseline`` when higher is better (throughput), ``baseline / value`` otherwise (seconds,
    bytes), so a ratio always reads the same way whatever the unit.
    """
    if baseline is None or value == 0 or baseline == 0:
        return None
    return value / baseline if higher_is_better else baseline / value


def check_result(result: object) -> list[str]:
    """Problems with one figure returned by a module: missing/extra keys, wrong types, bad ratio."""
    if not isinstance(result, dict):
        return [f"a figure must be a dict, got {type(result).__name__}"]
    problems = [f"missing key {key!r}" for key in RESULT_KEYS if key not in result]
    problems += [f"unexpected key {key!r}" for key in result if key not in RESULT_KEYS]
    for key, types in RESULT_KEYS.items():
        if key not in result:
            continue
        value = result[key]
        # bool is an int subclass; a True/False number is a bug, not a figure.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = {numbers.Real: "a number", type(None): "None"}
            allowed = " or ".join(names.get(t, t.__name__) for t in types)
            problems.append(f"{key!r} must be {allowed}, got {type(value).__name__} {value!r}")
    if problems:
        return problems
    for key in ("value", "baseline", "ratio"):
        if result[key] is not None and not math.isfinite(result[key]):
            problems.append(f"{key!r} is not finite: {result[key]!r}")
    if (result["baseline"] is None) != (result["baseline_name"] is None):
        problems.append("'baseline' and 'baseline_name' must both be set or both be None")
    if problems:
        return problems
    expected = expected_ratio(result["value"], result["baseline"], result["higher_is_better"])
    ratio = result["ratio"]
    if expected is None and ratio is not None:
        problems.append(f"'ratio' is {ratio} but there is no usable baseline; it must be None")
    elif expected is not None and (ratio is None or not math.isclose(ratio, expected, rel_tol=RATIO_REL_TOL,
                                                                     abs_tol=RATIO_ABS_TOL)):
        formula = "value/baseline" if result["higher_is_better"] else "baseline/value"
        problems.append(f"'ratio' is {ratio} but {formula} = {expected:.6g} (higher_is_better="
                        f"{result['higher_is_better']})")
    return problems


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cuda`` must be present."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    return name


def _command_output(args: Sequence[str], cwd: Path | None = None) -> str | None:
    """stdout of a small command, stripped; None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Hostname, CPU model, usable cores, RAM (GiB), load average at the start, and the first GPU's
    name, memory and drivers."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cores": cores,
        "ram_gib": _ram_gib(),
        # Other processes competing for the cores make every CPU figure slower; recorded to judge that.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": None,
        "gpu_count": 0,
        "gpu_memory_gib": None,
        "gpu_driver": None,
        "cuda": torch.version.cuda,
        "cudnn": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_driver=driver.splitlines()[0] if driver else None,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state() -> dict:
    """``{"commit", "dirty"}`` of the checkout (``VF_COMMIT`` env var where git is absent, dirty None)."""
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT)
    status = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {
        "commit": commit or os.environ.get("VF_COMMIT"),
        # Tracked files edited since the commit: the figures may not be the commit's.
        "dirty": bool(status) if commit is not None and status is not None else None,
    }


def versions() -> dict:
    """Python and package versions, and the git commit at the start (see :func:`git_state`)."""
    import torch

    import volumefusion

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _package_version("numpy"),
        "SimpleITK": _package_version("SimpleITK"),
        "monai": _package_version("monai"),
        "volumefusion": volumefusion.__version__,
        **git_state(),
    }


def _error(benchmark: str, message: str, **extra) -> dict:
    return {"benchmark": benchmark, "error": message, **extra}


def _release_memory() -> None:
    """Free what a finished module left behind so the next one starts from an empty GPU."""
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def run_benchmarks(
    names: Sequence[str],
    *,
    tiny: bool,
    device: str,
    package: str = "benchmarks",
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    after_module: Callable[[list[dict], list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Run ``package.<name>.run(tiny=tiny, device=device)`` for each name, in order.

    Returns ``(results, errors, modules)``: the well-formed figures, each with ``benchmark`` (the
    module name) and ``seconds`` (the module's wall time) added; one error entry per failure
    (``benchmark``, ``error``, and ``traceback`` or the offending ``result``); and one status entry
    per module (``benchmark``, ``status`` in ok / error / missing, ``seconds``, and for a module that
    ran the ``commit`` and ``dirty`` flag when it started: the checkout may change during a long run).
    ``after_module(results, errors, modules)`` is called after each module.
    """
    results: list[dict] = []
    errors: list[dict] = []
    modules: list[dict] = []
    for name in names:
        qualified = f"{package}.{name}"
        if importlib.util.find_spec(qualified) is None:
            log(f"[benchmarks] {name}: skipped, {qualified.replace('.', '/')}.py does not exist yet")
            modules.append({"benchmark": name, "status": "missing", "seconds": 0.0})
            continue
        log(f"[benchmarks] {name}: running (tiny={tiny}, device={device})")
        checkout = git_state()
        start = time.perf_counter()
        try:
            figures = importlib.import_module(qualified).run(tiny=tiny, device=device)
            if not isinstance(figures, list):
                raise TypeError(f"run() must return a list of dicts, got {type(figures).__name__}")
        except Exception as exc:
            seconds = round(time.perf_counter() - start, 3)
            log(f"[benchmarks] {name}: FAILED after {seconds:.1f} s: {type(exc).__name__}: {exc}")
            errors.append(_error(name, f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
            modules.append({"benchmark": name, "status": "error", "seconds": seconds, **checkout})
        else:
            seconds = round(time.perf_counter() - start, 3)
            bad = 0
            for figure in figures:
                problems = check_result(figure)
                if problems:
                    bad += 1
                    label = figure.get("name", "?") if isinstance(figure, dict) else "?"
                    errors.append(_error(name, f"figure {label!r}: " + "; ".join(problems), result=figure))
                else:
                    results.append({"benchmark": name, **figure, "seconds": seconds})
            status = "error" if bad else "ok"
            log(f"[benchmarks] {name}: {len(figures) - bad} figures in {seconds:.1f} s"
                + (f", {bad} malformed (see errors)" if bad else ""))
            modules.append({"benchmark": name, "status": status, "seconds": seconds, **checkout})
        _release_memory()
        if after_module is not None:
            after_module(results, errors, modules)
    return results, errors, modules


def _json_default(value):
    """numpy / torch scalars and arrays in figures: write them as plain JSON numbers and lists."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(document: dict) -> str:
    return json.dumps(document, indent=1, default=_json_default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m benchmarks --tiny --device cpu --only fusion,loader --out cpu.json",
    )
    parser.add_argument("--tiny", action="store_true", help="small sizes that finish in seconds (smoke test)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device for the benchmarks (default: cuda when present, else cpu)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of: {','.join(MODULES)} (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    if args.only is None:
        args.names = list(MODULES)
    else:
        args.names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in args.names if n not in MODULES]
        if unknown or not args.names:
            given = ", ".join(unknown) or "(none given)"
            parser.error(f"--only {args.only!r}: unknown benchmark(s) {given}; "
                         f"choose from {', '.join(MODULES)}")
    try:
        args.device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from volumefusion.files import atomic_write_text

    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    document = {
        "machine": machine_info(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "device": args.device,
        "command": command.strip(),
        "complete": False,
        "modules": [],
        "results": [],
        "errors": [],
    }

    def record(results: list[dict], errors: list[dict], modules: list[dict], complete: bool = False) -> None:
        document.update(results=results, errors=errors, modules=modules, complete=complete)
        if args.out is not None:
            atomic_write_text(args.out, to_json(document) + "\n")

    outcome = run_benchmarks(args.names, tiny=args.tiny, device=args.device, after_module=record)
    record(*outcome, complete=True)
    print(to_json(document))
    ran = [m for m in document["modules"] if m["status"] != "missing"]
    print(f"[benchmarks] {len(document['results'])} figures from {len(ran)} modules, "
          f"{len(document['errors'])} errors" + (f"; written to {args.out}" if args.out else ""),
          file=sys.stderr)
    return 1 if document["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
