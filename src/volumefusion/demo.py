"""The embedded demo: Volume Fusion pretraining, fine-tuning, prediction and evaluation on phantoms.

Every stage runs the code of the matching command, on data the demo generates itself:

1. **data**: an unlabelled pool of procedural CT phantoms (plus the chest CT of ``slicerio`` when it
   is installed), prepared into a store by :func:`volumefusion.data.prepare.prepare`; a labelled MSD
   dataset of a few training phantoms and one validation phantom; held-out labelled test phantoms.
2. **pretrain**: Volume Fusion on the pool (:func:`volumefusion.train.runs.pretrain`).
3. **finetune**: for each seed, one run from the pretrained weights and one from scratch, with the
   same config, seed, split and number of steps (:func:`volumefusion.train.runs.finetune`). On a
   multi-core CPU the runs from scratch go beside pretraining, in a worker process.
4. **predict** / **evaluate**: every run's ``best.pt`` (chosen on the validation phantom) segments
   the held-out phantoms (``volumefusion predict``), scored by ``volumefusion evaluate``.
5. **report**: ``DIR/report.md`` with the Dice table and the pictures in ``DIR/figures/``.

The settings live in the bundled preset ``volumefusion/configs/demo.yaml`` (``--quick`` applies its
``quick`` section; ``volumefusion config --presets`` lists the presets). Output layout::

    DIR/configs/{pretrain,finetune}.yaml  the resolved configs, usable with the ordinary commands
    DIR/data/pool/ (raw phantoms), DIR/data/pool_store/, DIR/data/Task01_Phantom/ (MSD),
    DIR/data/split.json, DIR/data/test/{images,labels}/
    DIR/runs/pretrain/, DIR/runs/seed<S>/{pretrained,scratch}/ (+ predictions/, metrics.csv)
    DIR/figures/*.png, DIR/report.md, DIR/results.json
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from volumefusion import VolumeFusionError
from volumefusion.io import atomic_write_text
from volumefusion.log import get_logger

log = get_logger(__name__)

DEFAULT_CONFIG = "demo"
"""The bundled preset ``volumefusion/configs/demo.yaml``."""

SECTIONS = ("phantoms", "prepare", "seeds", "common", "pretrain", "finetune", "quick")
PHANTOM_FIELDS = ("shape", "spacing_zyx", "pool", "train", "val", "test", "chest_ct")
# Phantom seeds of each role start here, so the pool, training, validation and test phantoms differ.
SEED_BASE = {"pool": 1000, "train": 2000, "val": 2500, "test": 3000}
ARMS = ("scratch", "pretrained")


# --------------------------------------------------------------------------------------------------
# settings


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(path: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    """The demo settings from ``path`` (default :data:`DEFAULT_CONFIG`), with ``quick`` applied.

    Only the demo's own sections are checked here; ``common``/``pretrain``/``finetune`` are checked
    by :func:`volumefusion.config.load` when the stages build their configs.
    """
    from volumefusion.config import resolve_path

    path = resolve_path(path or DEFAULT_CONFIG)
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VolumeFusionError(f"{path} is not valid YAML: {exc}") from None
    unknown = sorted(set(settings) - set(SECTIONS))
    if unknown:
        raise VolumeFusionError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    quick_part = settings.pop("quick", None) or {}
    if quick:
        settings = _merge(settings, quick_part)
    phantoms = settings.get("phantoms") or {}
    missing = [f for f in PHANTOM_FIELDS if f not in phantoms]
    extra = sorted(set(phantoms) - set(PHANTOM_FIELDS))
    if missing or extra:
        raise VolumeFusionError(f"{path}: phantoms needs exactly the fields {', '.join(PHANTOM_FIELDS)} "
                                f"(missing: {missing or 'none'}, unknown: {extra or 'none'})")
    for role in ("pool", "train", "val", "test"):
        if not isinstance(phantoms[role], int) or phantoms[role] < 1:
            raise VolumeFusionError(f"{path}: phantoms.{role} must be a positive integer, "
                                    f"got {phantoms[role]!r}")
    if phantoms["pool"] + int(phantoms["chest_ct"]) < 2:
        raise VolumeFusionError(f"{path}: Volume Fusion needs at least 2 pool volumes (phantoms.pool)")
    seeds = settings.get("seeds")
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise VolumeFusionError(f"{path}: seeds must be a list of non-negative integers, got {seeds!r}")
    for name in ("prepare", "common", "pretrain", "finetune"):
        settings[name] = settings.get(name) or {}
    return settings


# --------------------------------------------------------------------------------------------------
# progress


class _Clock:
    """Logs each stage with the time since the demo started, and keeps the stage durations."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wall_start = time.time()
        self.seconds: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        log.info("[demo %6.1f s] %s: %s", self.elapsed(), name, what)
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        log.info("[demo %6.1f s] %s: done in %.1f s", self.elapsed(), name, dt)


# --------------------------------------------------------------------------------------------------
# stages


@dataclass
class DemoData:
    pool_store: Path
    pool_inputs: list[str]
    dataset: Path
    split: Path
    test_images: Path
    test_labels: Path
    chest_ct: bool


def _phantom_seeds(phantoms: dict, role: str) -> list[int]:
    return [SEED_BASE[role] + i for i in range(phantoms[role])]


def make_data(settings: dict, root: Path) -> DemoData:
    """Write the phantoms, prepare the unlabelled pool and write the split file."""
    from volumefusion.data.phantoms import write_msd_dataset, write_phantoms
    from volumefusion.data.prepare import prepare
    from volumefusion.data.samples import chest_ct
    from volumefusion.preprocess import PrepareSettings

    p = settings["phantoms"]
    geometry = {"shape": tuple(p["shape"]), "spacing_zyx": tuple(p["spacing_zyx"])}
    write_phantoms(root / "pool", _phantom_seeds(p, "pool"), with_labels=False, **geometry)
    inputs = [str(root / "pool" / "images")]
    with_ct = False
    if p["chest_ct"]:
        try:
            inputs.append(str(chest_ct()[0]))
            with_ct = True
        except VolumeFusionError as exc:
            log.info("pool without the real chest CT (%s)", exc)
    summary = prepare(inputs, root / "pool_store", PrepareSettings(**settings["prepare"]))
    if summary.failed:
        raise VolumeFusionError("preparing the demo pool failed: " + "; ".join(r for _, r in summary.failed))

    train_seeds, val_seeds = _phantom_seeds(p, "train"), _phantom_seeds(p, "val")
    dataset = write_msd_dataset(root / "Task01_Phantom", train_seeds + val_seeds, **geometry)
    entries = json.loads((dataset / "dataset.json").read_text())["training"]
    ids = [Path(e["image"]).name.removesuffix(".nii.gz") for e in entries]
    split = root / "split.json"
    atomic_write_text(split, json.dumps({"train": ids[: len(train_seeds)], "val": ids[len(train_seeds):]},
                                        indent=1) + "\n")
    test = write_phantoms(root / "test", _phantom_seeds(p, "test"), with_labels=True, **geometry)
    merge_paired_organs(dataset, [dataset / "labelsTr", root / "test" / "labels"])
    return DemoData(root / "pool_store", inputs, dataset, split, test[0].parent,
                    root / "test" / "labels", with_ct)


def paired_organs_merged(names: dict[int, str]) -> tuple[dict[int, str], np.ndarray]:
    """Label names with each ``X_right``/``X_left`` pair merged into one class ``X``, and the uint8
    lookup table old value -> new value (new values numbered in order of first appearance)."""
    merged: dict[str, int] = {}
    table = np.zeros(max(names) + 1, dtype=np.uint8)
    for value, name in sorted(names.items()):
        base = name.removesuffix("_right").removesuffix("_left")
        table[value] = merged.setdefault(base, len(merged))
    return {v: k for k, v in merged.items()}, table


def merge_paired_organs(dataset: Path, label_dirs: list[Path]) -> None:
    """Rewrite the label maps in ``label_dirs`` and ``dataset/dataset.json`` with left/right organs merged.

    Fine-tuning augmentation mirrors every axis, so a left and a right organ look alike to the
    network; with a few hundred steps that ambiguity, not the starting weights, would decide which
    lung gets which label. Merging the pairs keeps the comparison about the weights.
    """
    from volumefusion.data.datasets import read_dataset_description
    from volumefusion.io import read_image, write_image

    meta, labels = read_dataset_description(dataset / "dataset.json")
    names, table = paired_organs_merged(labels)
    for folder in label_dirs:
        for path in sorted(folder.glob("*.nii.gz")):
            label, geometry = read_image(path)
            write_image(path, table[label], geometry)
    meta["labels"] = {str(k): v for k, v in names.items()}
    atomic_write_text(dataset / "dataset.json", json.dumps(meta, indent=1) + "\n")


def write_configs(settings: dict, out: Path) -> tuple[Path, Path]:
    """``out/pretrain.yaml`` and ``out/finetune.yaml``: ``common`` merged with each stage's section."""
    paths = []
    for stage in ("pretrain", "finetune"):
        path = out / f"{stage}.yaml"
        merged = _merge(settings["common"], settings[stage])
        header = f"# volumefusion demo: {stage} config (common + {stage} sections of the demo settings)\n"
        atomic_write_text(path, header + yaml.safe_dump(merged, sort_keys=False))
        paths.append(path)
    return paths[0], paths[1]


def _command(argv: list[str]) -> None:
    """Run a ``volumefusion`` subcommand in this process (its parser and code, not the logging setup)."""
    from volumefusion.cli import build_parser

    args = build_parser().parse_args(argv)
    status = args.func(args)
    if status:
        raise VolumeFusionError(f"`volumefusion {' '.join(argv)}` failed (exit status {status})")


def _read_dice(csv_path: Path) -> dict[str, dict[str, float]]:
    """``{organ: {case: dice}}`` from an evaluation CSV."""
    out: dict[str, dict[str, float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["label"], {})[row["case"]] = float(row["dice"])
    return out


@dataclass
class RunResult:
    seed: int
    arm: str
    run_dir: Path
    seconds: float
    best_score: float | None
    dice: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def organ_dice(self) -> dict[str, float]:
        """Mean Dice over the test cases, per organ."""
        return {organ: float(np.mean(list(cases.values()))) for organ, cases in self.dice.items()}

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.organ_dice.values())))


@dataclass
class DemoResult:
    out: Path
    report: Path
    runs: list[RunResult]
    seconds: dict[str, float]
    total_seconds: float


# --------------------------------------------------------------------------------------------------
# figures and report


def _val_series(run_dir: Path, key: str) -> list[tuple[float, float]]:
    from volumefusion.train.logging import read_metrics

    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def _curves_figure(runs: list[RunResult], path: Path) -> Path:
    """Fine-tuning validation Dice and training loss against step, pretrained vs scratch, every seed."""
    from volumefusion.viz import save_curves

    panels: dict[str, dict[str, list]] = {"validation mean Dice (fine-tuning)": {}, "training loss": {}}
    for r in runs:
        name = f"{r.arm}, seed {r.seed}"
        panels["validation mean Dice (fine-tuning)"][name] = _val_series(r.run_dir, "val_score")
        panels["training loss"][name] = _val_series(r.run_dir, "loss")
    return save_curves(path, panels, title="pretrained vs scratch: same data, seed and steps")


def _overlay_figure(runs: list[RunResult], data: DemoData, label_names: dict[int, str], path: Path) -> Path:
    """Held-out phantoms (first seed): image, truth, scratch and pretrained predictions on two slices."""
    from volumefusion.io import read_image
    from volumefusion.viz import label_overlay, save_montage

    seed = runs[0].seed
    by_arm = {r.arm: r for r in runs if r.seed == seed}
    cases = sorted(p.name for p in data.test_labels.iterdir())[:2]
    columns: list[str] = []
    rows: dict[str, list[np.ndarray]] = {"image": [], "truth": [], "scratch": [], "pretrained": []}
    for case in cases:
        image, _ = read_image(data.test_images / case)
        truth, _ = read_image(data.test_labels / case)
        preds = {arm: read_image(by_arm[arm].run_dir / "predictions" / case)[0] for arm in ARMS}
        # one slice through the abdomen, one through the chest (phantoms span both along z)
        for frac in (0.3, 0.7):
            z = int(round(frac * (image.shape[0] - 1)))
            columns.append(f"{case.removesuffix('.nii.gz')}, z={z}")
            shown = image[z]
            rows["image"].append(np.clip((shown + 400) / 800, 0, 1))
            rows["truth"].append(label_overlay(shown, truth[z], 0.5, (-400, 400)))
            for arm in ARMS:
                rows[arm].append(label_overlay(shown, preds[arm][z], 0.5, (-400, 400)))
    names = [label_names.get(i, str(i)) for i in range(max(label_names) + 1)]
    titled = [(f"{k} (seed {seed})" if k in ARMS else k, v, "image") for k, v in rows.items()]
    return save_montage(path, titled, col_titles=columns, window=(0, 1), label_names=names, cell=1.9,
                        title="held-out phantoms: truth and predictions (window -400..400 HU)")


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _dice_tables(runs: list[RunResult], seeds: list[int]) -> tuple[str, str, dict]:
    """Markdown: per-organ table (mean over seeds) and per-seed mean Dice; plus the numbers."""
    organs = list(runs[0].organ_dice)
    per = {(r.seed, r.arm): r for r in runs}
    organ_means = {arm: {o: float(np.mean([per[s, arm].organ_dice[o] for s in seeds])) for o in organs}
                   for arm in ARMS}
    multi = len(seeds) > 1
    head = "| organ | scratch | pretrained | difference |"
    if multi:
        head = "| organ | scratch (mean over seeds) | pretrained (mean over seeds) | difference |"
    lines = [head, "| --- | ---: | ---: | ---: |"]
    for o in organs:
        a, b = organ_means["scratch"][o], organ_means["pretrained"][o]
        lines.append(f"| {o} | {_fmt(a)} | {_fmt(b)} | {b - a:+.3f} |")
    means = {arm: float(np.mean([per[s, arm].mean_dice for s in seeds])) for arm in ARMS}
    lines.append(f"| **mean** | **{_fmt(means['scratch'])}** | **{_fmt(means['pretrained'])}** | "
                 f"**{means['pretrained'] - means['scratch']:+.3f}** |")
    organ_table = "\n".join(lines)

    seed_lines = ["| seed | scratch mean Dice | pretrained mean Dice | difference | pretrained better |",
                  "| --- | ---: | ---: | ---: | :---: |"]
    wins = 0
    for s in seeds:
        a, b = per[s, "scratch"].mean_dice, per[s, "pretrained"].mean_dice
        wins += b > a
        seed_lines.append(f"| {s} | {_fmt(a)} | {_fmt(b)} | {b - a:+.3f} | {'yes' if b > a else 'no'} |")
    if multi:
        sd = {arm: float(np.std([per[s, arm].mean_dice for s in seeds])) for arm in ARMS}
        seed_lines.append(f"| mean ± sd | {_fmt(means['scratch'])} ± {sd['scratch']:.3f} | "
                          f"{_fmt(means['pretrained'])} ± {sd['pretrained']:.3f} | "
                          f"{means['pretrained'] - means['scratch']:+.3f} | {wins} of {len(seeds)} |")
    diffs = [per[s, "pretrained"].mean_dice - per[s, "scratch"].mean_dice for s in seeds]
    numbers = {"organ_dice": organ_means, "mean_dice": means, "wins": wins, "seeds": seeds,
               "difference_sd": float(np.std(diffs, ddof=1)) if multi else None,
               "sign_test_p": sign_test_p(wins, len(seeds))}
    return organ_table, "\n".join(seed_lines), numbers


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: the chance of at least ``wins`` wins in ``n`` paired runs if pretraining
    made no difference (each run a fair coin)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def _copy_figure(source: Path, target: Path) -> str | None:
    if not source.is_file():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return f"figures/{target.name}"


def write_report(out: Path, settings: dict, data: DemoData, pretrain_result, runs: list[RunResult],
                 clock: _Clock, device: str, quick: bool, schedule: str) -> Path:
    """``out/report.md``, ``out/results.json`` and the pictures under ``out/figures/``."""
    from volumefusion.data.datasets import read_dataset_description

    figures = out / "figures"
    seeds = sorted({r.seed for r in runs})
    organ_table, seed_table, numbers = _dice_tables(runs, seeds)
    diff = numbers["mean_dice"]["pretrained"] - numbers["mean_dice"]["scratch"]
    _curves_figure(runs, figures / "finetune_curves.png")
    label_names = read_dataset_description(data.dataset / "dataset.json")[1]
    _overlay_figure(runs, data, label_names, figures / "predictions.png")
    pre_progress = _copy_figure(out / "runs" / "pretrain" / "progress.png", figures / "pretrain_progress.png")
    ft_progress = {arm: _copy_figure(out / "runs" / f"seed{seeds[0]}" / arm / "progress.png",
                                     figures / f"finetune_{arm}_progress.png") for arm in ARMS}
    p = settings["phantoms"]
    pretext = [r for r in pretrain_result.history if "val_score" in r]
    pretext_line = ""
    if pretext:
        pretext_line = (f"Pretext validation Dice (5 fusion classes, fixed fused crops): "
                        f"{pretext[0]['val_score']:.3f} at step {pretext[0]['step']} → "
                        f"{pretext[-1]['val_score']:.3f} at step {pretext[-1]['step']}.")
    ft = yaml.safe_load((out / "configs" / "finetune.yaml").read_text())
    pt = yaml.safe_load((out / "configs" / "pretrain.yaml").read_text())
    verdict = (f"Over {len(seeds)} seed(s), fine-tuning from the Volume Fusion weights gave a mean Dice of "
               f"{numbers['mean_dice']['pretrained']:.3f} against {numbers['mean_dice']['scratch']:.3f} from "
               f"scratch ({diff:+.3f}); pretrained was better on {numbers['wins']} of {len(seeds)} seed(s).")
    if len(seeds) > 1:
        verdict += (f" The paired difference varies by {numbers['difference_sd']:.3f} (sd) from seed to seed; "
                    f"{numbers['wins']} or more wins in {len(seeds)} happen with probability "
                    f"{numbers['sign_test_p']:.2f} when the starting weights make no difference (sign test)")
        verdict += (", so more seeds are needed before this is a finding." if numbers["sign_test_p"] > 0.05
                    else ".")
    spacing = settings["prepare"].get("spacing_zyx")
    spacing = f" --spacing {' '.join(map(str, spacing))}" if spacing else ""
    run = f"{out}/rerun/seed{seeds[0]}/pretrained"
    stage_rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in clock.seconds.items())
    pool_text = f"{p['pool']} phantoms" + (" + the slicerio chest CT" if data.chest_ct else "")
    lines = [
        f"# volumefusion demo report{' (--quick)' if quick else ''}",
        "",
        "Volume Fusion pretraining, then fine-tuning with few labels from the pretrained weights and "
        "from scratch, on procedural CT phantoms; every stage ran the code of the matching "
        "`volumefusion` command.",
        "",
        f"**Result.** {verdict}",
        "",
        "## Setup",
        "",
        f"- Phantoms: {list(p['shape'])} voxels (z, y, x) at {list(p['spacing_zyx'])} mm; pretraining pool: "
        f"{pool_text} (no labels used); fine-tuning: {p['train']} labelled training phantom(s), {p['val']} "
        f"validation phantom(s) (choose `best.pt`); evaluation: {p['test']} held-out phantoms. "
        f"Classes: {', '.join(list(label_names.values())[1:])} (left and right lungs and kidneys are one "
        "class each: fine-tuning mirrors every axis, which makes sides ambiguous).",
        f"- Network: PCT-Net, feature channels {pt['model']['feature_channels']}, crop "
        f"{pt['data']['crop_size']}, batch {pt['run']['batch_size']}.",
        f"- Pretraining: {pt['run']['max_steps']} steps, Volume Fusion "
        f"`{pt.get('fusion', {}).get('mode', 'boxes')}`, lr {pt['optim']['lr']}. {pretext_line}",
        f"- Fine-tuning: {ft['run']['max_steps']} steps per run, lr {ft['optim']['lr']}, seeds {seeds}; "
        "the two arms share config, seed, data order and augmentation, and differ only in the starting "
        "weights.",
        f"- Machine: {platform.machine()}, {_cpu_count()} CPU core(s), device {device}; schedule: {schedule}; "
        f"total {clock.elapsed():.0f} s.",
        "",
        "## Dice on the held-out phantoms",
        "",
        organ_table,
        "",
        seed_table,
        "",
        "Per case and organ (Dice, HD95, ASSD, NSD): `runs/seed<S>/<arm>/metrics.csv`.",
        "",
        "## Volume Fusion",
        "",
        "What the network learns in pretraining: fuse a foreground crop into a background crop with a "
        "random class map and predict that map (`volumefusion show fusion`).",
        "",
        "![fusion](figures/fusion.png)",
        "",
        "## Training curves",
        "",
        "Fine-tuning validation Dice on the validation phantom, every seed:",
        "",
        "![fine-tuning curves](figures/finetune_curves.png)",
        "",
    ]
    if pre_progress:
        lines += ["Pretraining (`runs/pretrain/progress.png`):", "", f"![pretraining]({pre_progress})", ""]
    for arm in ARMS:
        if ft_progress[arm]:
            lines += [f"Fine-tuning, {arm}, seed {seeds[0]}:", "", f"![{arm}]({ft_progress[arm]})", ""]
    lines += [
        "## Predictions",
        "",
        "![predictions](figures/predictions.png)",
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
        stage_rows,
        "",
        "## Rerun a stage by hand",
        "",
        "Each command writes a new folder under `rerun/` (a run folder that holds checkpoints is only "
        "continued, with `--resume`):",
        "",
        "```bash",
        f"volumefusion prepare {' '.join(data.pool_inputs)} --out {out}/rerun/pool_store{spacing}",
        f"volumefusion pretrain -c {out}/configs/pretrain.yaml --data {out}/rerun/pool_store "
        f"--out {out}/rerun/pretrain",
        f"volumefusion finetune -c {out}/configs/finetune.yaml --data {out}/data/Task01_Phantom "
        f"--split {out}/data/split.json --seed {seeds[0]} "
        f"--pretrained {out}/rerun/pretrain/checkpoints/latest.pt --out {run}",
        f"volumefusion predict -m {run}/checkpoints/best.pt -i {out}/data/test/images -o {run}/predictions",
        f"volumefusion evaluate --pred {run}/predictions --gt {out}/data/test/labels "
        f"--labels {out}/data/Task01_Phantom/dataset.json --out {run}/metrics.csv",
        "```",
        "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    results = {
        "quick": quick, "device": device, "schedule": schedule, "seconds": clock.seconds,
        "total_seconds": clock.elapsed(), **numbers,
        "runs": [{"seed": r.seed, "arm": r.arm, "mean_dice": r.mean_dice, "organ_dice": r.organ_dice,
                  "val_best": r.best_score, "seconds": r.seconds} for r in runs],
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    return report


# --------------------------------------------------------------------------------------------------
# the demo


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run with its prediction and evaluation of the held-out phantoms (picklable, so
    that it can run in a worker process)."""

    seed: int
    arm: str
    run_dir: Path
    config: Path
    overrides: tuple[str, ...]
    dataset: Path
    pretrained: Path | None
    test_images: Path
    test_labels: Path
    device: str
    wall_start: float
    """``time.time()`` when the demo started, for the progress lines."""


def run_job(job: FinetuneJob, threads: int | None = None, verbosity: int | None = None) -> RunResult:
    """Fine-tune, predict the held-out phantoms with ``best.pt`` and evaluate; in a worker process
    ``threads`` sets torch's thread count and ``verbosity`` the log level (see :func:`volumefusion.log.setup`)."""
    from volumefusion.train.runs import finetune

    if threads:
        torch.set_num_threads(threads)
    if verbosity is not None:
        from volumefusion.log import setup

        setup(verbosity)

    def progress(what: str) -> None:
        log.info("[demo %6.1f s] seed %d, %s: %s", time.time() - job.wall_start, job.seed, job.arm, what)

    progress("fine-tuning")
    t0 = time.perf_counter()
    result = finetune([str(job.config)], list(job.overrides), job.dataset, job.run_dir, job.pretrained)
    seconds = time.perf_counter() - t0
    progress(f"fine-tuned in {seconds:.0f} s; predicting and evaluating")
    _command(["predict", "-m", str(job.run_dir / "checkpoints" / "best.pt"), "-i", str(job.test_images),
              "-o", str(job.run_dir / "predictions"), "--device", job.device])
    _command(["evaluate", "--pred", str(job.run_dir / "predictions"), "--gt", str(job.test_labels),
              "--labels", str(job.dataset / "dataset.json"), "--out", str(job.run_dir / "metrics.csv")])
    run = RunResult(job.seed, job.arm, job.run_dir, seconds, result.best_score,
                    _read_dice(job.run_dir / "metrics.csv"))
    progress(f"mean Dice {run.mean_dice:.3f} on the held-out phantoms")
    return run


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parallel_runs(device: str, jobs: int) -> tuple[int, int | None]:
    """How many fine-tuning runs go at once and with how many torch threads each (None: unchanged).

    On a CPU, two runs of one process each beat one run of two threads: a small 3D network gains
    little from a second intra-op thread (about 1.2x on 2 cores), and OpenMP threads stall when
    another process takes a core. On a GPU the runs go one after the other.
    """
    from volumefusion.device import resolve_device

    cpus = _cpu_count()
    if resolve_device(device).type != "cpu" or cpus < 2 or jobs < 2:
        return 1, None
    return 2, max(1, cpus // 2)


def _run_in_order(jobs: list[FinetuneJob], threads: int | None, verbosity: int | None) -> list[RunResult]:
    """The jobs one after another (in a worker process: ``threads`` and ``verbosity`` as in :func:`run_job`)."""
    return [run_job(job, threads, verbosity) for job in jobs]


def _worker_verbosity() -> int:
    """This process's log level as a :func:`volumefusion.log.setup` verbosity, for worker processes."""
    import logging

    level = get_logger("volumefusion").getEffectiveLevel()
    return 1 if level <= logging.DEBUG else -1 if level >= logging.WARNING else 0


def _pretrain_beside_scratch(cfg, data: DemoData, out: Path, jobs: dict[str, list[FinetuneJob]],
                             threads: int | None, clock: _Clock):
    """Pretrain in this process while a worker fine-tunes the from-scratch arm (it needs no pretrained
    weights), then fine-tune from the pretrained weights on two workers. Returns ``(pretraining
    result, runs)``. Every process keeps ``threads`` torch threads, so each run computes exactly what
    it would alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from volumefusion.train.runs import pretrain

    verbosity = _worker_verbosity()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    try:
        scratch = pool.submit(_run_in_order, jobs["scratch"], threads, verbosity)
        with clock.stage("pretrain + scratch fine-tuning",
                         f"Volume Fusion, {cfg.run.max_steps} steps, beside {len(jobs['scratch'])} runs from scratch"):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads or previous)
            try:
                result = pretrain(cfg, data.pool_store, out / "runs" / "pretrain")
            finally:
                torch.set_num_threads(previous)
        with clock.stage("pretrained fine-tuning + predict + evaluate",
                         f"{len(jobs['pretrained'])} runs from the pretrained weights"):
            futures = [pool.submit(run_job, job, threads, verbosity) for job in jobs["pretrained"]]
            runs = [f.result() for f in futures] + scratch.result()
    finally:
        pool.shutdown(cancel_futures=True)
    return result, runs


def run_demo(out: str | Path = "vf-demo", *, quick: bool = False, seeds: list[int] | None = None,
             device: str = "auto", config: str | Path | None = None) -> DemoResult:
    """Run the whole demo into ``out`` and return what it measured; see the module docstring."""
    from volumefusion import config as vf_config
    from volumefusion.train.runs import pretrain

    settings = load_settings(config, quick)
    if seeds:
        settings["seeds"] = list(seeds)
    out = Path(out).resolve()
    if (out / "report.md").exists() or (out / "runs").exists():
        raise VolumeFusionError(f"{out} holds an earlier demo; remove it or choose another --out")
    clock = _Clock()
    device_override = [f"run.device={device}"]

    with clock.stage("data", "phantoms, chest CT and the prepared pool"):
        data = make_data(settings, out / "data")
        pretrain_yaml, finetune_yaml = write_configs(settings, out / "configs")
        log.info("pool: %d phantoms%s; %d labelled training, %d validation, %d test phantoms",
                 settings["phantoms"]["pool"], " + the chest CT" if data.chest_ct else "",
                 settings["phantoms"]["train"], settings["phantoms"]["val"], settings["phantoms"]["test"])

    with clock.stage("fusion figure", "volumefusion show fusion"):
        _command(["show", "fusion", "--out", str(out / "figures" / "fusion.png"), "-i", str(data.pool_store),
                  "-c", str(pretrain_yaml), "--samples", "4"])

    cfg = vf_config.load([pretrain_yaml], device_override)
    pretrained = out / "runs" / "pretrain" / "checkpoints" / "latest.pt"
    jobs = {arm: [FinetuneJob(seed, arm, out / "runs" / f"seed{seed}" / arm, finetune_yaml,
                              (*device_override, f"run.seed={seed}", f"finetune.split_file={data.split}"),
                              data.dataset, pretrained if arm == "pretrained" else None, data.test_images,
                              data.test_labels, device, clock.wall_start)
                  for seed in settings["seeds"]]
            for arm in ARMS}
    workers, threads = _parallel_runs(device, 2 * len(settings["seeds"]))
    if workers == 1:
        schedule = "one stage after the other"
        with clock.stage("pretrain", f"Volume Fusion, {cfg.run.max_steps} steps"):
            pretrain_result = pretrain(cfg, data.pool_store, out / "runs" / "pretrain")
        with clock.stage("finetune + predict + evaluate", f"{2 * len(settings['seeds'])} runs, one at a time"):
            runs = [run_job(job) for arm in ARMS for job in jobs[arm]]
    else:
        schedule = (f"the runs from scratch (which need no pretrained weights) one after another beside "
                    f"pretraining, then the runs from the pretrained weights {workers} at a time; every process "
                    f"with {threads} torch thread(s)")
        pretrain_result, runs = _pretrain_beside_scratch(cfg, data, out, jobs, threads, clock)
    runs = sorted(runs, key=lambda r: (r.seed, ARMS.index(r.arm)))

    with clock.stage("report", "tables and figures"):
        report = write_report(out, settings, data, pretrain_result, runs, clock, device, quick, schedule)
    log.info("[demo %6.1f s] report: %s", clock.elapsed(), report)
    return DemoResult(out, report, runs, clock.seconds, clock.elapsed())
