"""The demo's report: ``report.md`` for people, ``report.json`` with every number for programs, and
the pictures in ``figures/``.

Numbers: a run's score is the mean over organs of its mean Dice over the held-out phantoms; each
regime compares ``builtin`` and ``live`` with ``scratch`` seed by seed (:mod:`volumefusion.demo.stats`).
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np

from volumefusion.checkpoint import load_checkpoint
from volumefusion.config import to_dict
from volumefusion.demo.data import DemoData
from volumefusion.demo.results import PretrainResult, RunResult
from volumefusion.demo.settings import ARMS, DemoSettings
from volumefusion.demo.stats import compare_paired
from volumefusion.io import atomic_write_text, read_image
from volumefusion.processes import cpu_count
from volumefusion.viz import label_overlay, save_band_curves, save_curves, save_montage

ARM_TEXT = {"scratch": "from scratch", "builtin": "built-in weights", "live": "live pretraining"}


def _f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.4f}"


def summarise(settings: DemoSettings, runs: list[RunResult]) -> dict:
    """Per regime: mean Dice and per-organ Dice of each arm (means over seeds), per-seed mean Dice,
    and the paired comparisons of ``builtin`` and ``live`` with ``scratch``."""
    proto = settings.protocol
    out = {}
    for n in proto.labelled:
        per = {(r.seed, r.arm): r for r in runs if r.labelled == n}
        seeds = [s for s in proto.seeds if all((s, a) in per for a in ARMS)]
        if not seeds:
            continue
        organs = list(per[seeds[0], "scratch"].organ_dice)
        by_seed = {a: [per[s, a].mean_dice for s in seeds] for a in ARMS}
        regime = {
            "seeds": seeds,
            "mean_dice": {a: float(np.mean(by_seed[a])) for a in ARMS},
            "sd_dice": {a: float(np.std(by_seed[a], ddof=1)) if len(seeds) > 1 else None for a in ARMS},
            "seed_mean_dice": {a: dict(zip(map(str, seeds), by_seed[a])) for a in ARMS},
            "organ_dice": {a: {o: float(np.mean([per[s, a].organ_dice[o] for s in seeds])) for o in organs}
                           for a in ARMS},
            "comparisons": {},
        }
        for arm in ("builtin", "live"):
            c = compare_paired(by_seed["scratch"], by_seed[arm], alternative=proto.alternative,
                               resamples=proto.bootstrap, seed=proto.bootstrap_seed)
            regime["comparisons"][f"{arm} - scratch"] = c.to_dict()
        out[str(n)] = regime
    return out


def _verdict(settings: DemoSettings, summary: dict) -> tuple[str, dict]:
    proto = settings.protocol
    regime = summary.get(str(proto.primary))
    if regime is None:
        return "No complete seed in the primary regime.", {}
    c = regime["comparisons"]["builtin - scratch"]
    significant = (c["p_value"] is not None and c["p_value"] < proto.alpha and c["ci_low"] > 0)
    primary = {"regime": proto.primary, "comparison": "builtin - scratch", "alternative": proto.alternative,
               "alpha": proto.alpha, **c, "significant": significant}
    m = regime["mean_dice"]
    side = "one-sided, builtin better" if proto.alternative == "greater" else "two-sided"
    text = (f"With {proto.primary} labelled phantom{'s' if proto.primary > 1 else ''}, fine-tuning from the "
            f"built-in Volume Fusion weights reached a held-out mean Dice of {m['builtin']:.3f} against "
            f"{m['scratch']:.3f} from scratch over {c['n']} seeds: paired difference {c['mean_difference']:+.3f} "
            f"(95 % bootstrap interval {c['ci_low']:+.3f} to {c['ci_high']:+.3f}; Wilcoxon signed-rank p = "
            f"{_p(c['p_value'])}, {side}; better on {c['wins']} of {c['n']} seeds). ")
    text += ("By the protocol fixed in advance, this is a significant gain." if significant else
             "By the protocol fixed in advance, this is not a significant gain.")
    return text, primary


def _regime_tables(n: str, regime: dict) -> list[str]:
    m, sd = regime["mean_dice"], regime["sd_dice"]
    lines = [f"### {n} labelled training phantom{'s' if int(n) > 1 else ''}", "",
             "| organ | " + " | ".join(ARM_TEXT[a] for a in ARMS) + " |", "| --- |" + " ---: |" * len(ARMS)]
    for organ in regime["organ_dice"]["scratch"]:
        lines.append(f"| {organ} | " + " | ".join(_f3(regime["organ_dice"][a][organ]) for a in ARMS) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_f3(m[a])}**" + (f" ± {sd[a]:.3f}" if sd[a] is not None else "")
                                                for a in ARMS) + " |")
    lines += ["", "Mean Dice per seed:", "", "| seed | " + " | ".join(ARMS) + " |", "| --- |" + " ---: |" * len(ARMS)]
    for s in regime["seeds"]:
        lines.append(f"| {s} | " + " | ".join(_f3(regime["seed_mean_dice"][a][str(s)]) for a in ARMS) + " |")
    lines += ["", "| comparison | mean difference | 95 % bootstrap interval | Wilcoxon p | better on |",
              "| --- | ---: | :---: | ---: | ---: |"]
    for name, c in regime["comparisons"].items():
        lines.append(f"| {name} | {c['mean_difference']:+.3f} | {c['ci_low']:+.3f} to {c['ci_high']:+.3f} | "
                     f"{_p(c['p_value'])} | {c['wins']} of {c['n']} |")
    return lines + [""]


def _curves_figure(settings: DemoSettings, runs: list[RunResult], path: Path) -> Path:
    """Validation mean Dice against fine-tuning step: one panel per regime, one line per arm."""
    panels = {}
    for n in settings.protocol.labelled:
        group = {}
        for arm in ARMS:
            curves = [r.curve for r in runs if r.labelled == n and r.arm == arm and r.curve]
            if curves:
                length = min(len(c) for c in curves)
                steps = [s for s, _ in curves[0][:length]]
                group[ARM_TEXT[arm]] = (steps, np.array([[v for _, v in c[:length]] for c in curves]))
        panels[f"{n} labelled phantom{'s' if n > 1 else ''}"] = group
    return save_band_curves(path, panels, ylabel="validation mean Dice",
                            title="fine-tuning: mean over seeds, band = min to max")


def _pretext_figure(pretraining: PretrainResult, path: Path) -> Path:
    """Pretext validation Dice of the live pretraining, overall and per fusion level."""
    records = pretraining.validation
    levels = sorted(k for k in records[0] if k.startswith("val_dice_a"))
    series = {"mean": [(r["step"], r["val_score"]) for r in records]}
    series.update({k.removeprefix("val_dice_"): [(r["step"], r[k]) for r in records] for k in levels})
    return save_curves(path, {"pretext validation Dice (live pretraining)": series})


def _predictions_figure(out: Path, data: DemoData, settings: DemoSettings, path: Path) -> Path:
    """Two held-out phantoms: image, truth and each arm's prediction (first seed, primary regime)."""
    seed, n = settings.protocol.seeds[0], settings.protocol.primary
    cases = sorted(p.name for p in data.test_labels.glob("*.nii.gz"))[:2]
    rows: dict[str, list] = {"image": [], "truth": [], **{ARM_TEXT[a]: [] for a in ARMS}}
    columns = []
    for case in cases:
        image, _ = read_image(data.test_images / case)
        truth, _ = read_image(data.test_labels / case)
        preds = {a: read_image(out / "runs" / f"{n}labelled" / f"seed{seed}" / a / "predictions" / case)[0]
                 for a in ARMS}
        for frac in (0.3, 0.7):  # one slice through the abdomen, one through the chest
            z = int(round(frac * (image.shape[0] - 1)))
            columns.append(f"{case.removesuffix('.nii.gz')}, z={z}")
            rows["image"].append(np.clip((image[z] + 200) / 500, 0, 1))
            rows["truth"].append(label_overlay(image[z], truth[z], 0.5, (-200, 300)))
            for a in ARMS:
                rows[ARM_TEXT[a]].append(label_overlay(image[z], preds[a][z], 0.5, (-200, 300)))
    names = [data.label_names.get(i, str(i)) for i in range(max(data.label_names) + 1)]
    return save_montage(path, [(k, v, "image") for k, v in rows.items()], col_titles=columns, window=(0, 1),
                        label_names=names, cell=1.9,
                        title=f"held-out phantoms, {n} labelled, seed {seed} (window -200..300 HU)")


def _builtin_card(path: Path) -> dict:
    """What the built-in checkpoint says about itself (its ``card``, written with the weights)."""
    ckpt = load_checkpoint(path)
    return {"path": str(path), "step": ckpt.get("step"), **(ckpt.get("card") or {})}


def write_report(out: Path, settings: DemoSettings, data: DemoData, pretraining: PretrainResult,
                 runs: list[RunResult], builtin: Path, *, device: str, quick: bool, workers: int,
                 seconds: float, expected: float) -> Path:
    """``out/report.md``, ``out/report.json`` and ``out/figures/*.png``; returns the report's path."""
    figures = out / "figures"
    summary = summarise(settings, runs)
    verdict, primary = _verdict(settings, summary)
    _curves_figure(settings, runs, figures / "finetune_curves.png")
    _pretext_figure(pretraining, figures / "pretext_curves.png")
    _predictions_figure(out, data, settings, figures / "predictions.png")
    if (pretraining.run_dir / "progress.png").is_file():
        shutil.copyfile(pretraining.run_dir / "progress.png", figures / "pretrain_progress.png")
    card = _builtin_card(builtin)
    live_last = pretraining.validation[-1] if pretraining.validation else {}
    p, proto = settings.phantoms, settings.protocol
    ft, pt = settings.finetune_run_config(), settings.pretrain_run_config()
    results = {
        "quick": quick, "device": device, "workers": workers, "cpu_cores": cpu_count(),
        "seconds": seconds, "expected_seconds": expected,
        "settings": to_dict(settings), "primary": primary, "regimes": summary,
        "pretraining": {"builtin": card, "live": {"seconds": pretraining.seconds, "steps": pt.run.max_steps,
                                                   "validation": pretraining.validation}},
        "runs": [r.to_dict() for r in runs],
    }
    atomic_write_text(out / "report.json", json.dumps(results, indent=1) + "\n")

    level_text = ", ".join(f"{k.removeprefix('val_dice_')} {v:.2f}" for k, v in live_last.items()
                           if k.startswith("val_dice_a"))
    builtin_pretext = card.get("pretext_dice") or {}
    lines = [
        f"# volumefusion demo report{' (--quick: a smoke run, too short to mean anything)' if quick else ''}",
        "",
        f"**Result.** {verdict}",
        "",
        "## Protocol (fixed in the demo settings before any result)",
        "",
        f"- Arms: fine-tuning {', '.join(ARM_TEXT[a] for a in ARMS)} (`{proto.builtin}`, and "
        f"{pt.run.max_steps} steps of Volume Fusion pretraining run by this demo); same config, seed, data order "
        "and augmentation; only the starting weights differ.",
        f"- Regimes: {', '.join(map(str, proto.labelled))} labelled training phantom(s); seeds "
        f"{list(proto.seeds)}; every run is scored on the same {p.test} held-out phantoms (mean over organs of "
        "the per-organ Dice averaged over phantoms), with the `best.pt` chosen on the validation phantom.",
        f"- Test: paired Wilcoxon signed-rank, exact, alternative `{proto.alternative}`, of builtin - scratch "
        f"mean Dice with {proto.primary} labelled phantom(s), at level {proto.alpha}; 95 % percentile bootstrap "
        f"interval of the mean paired difference ({proto.bootstrap} resamples, seed {proto.bootstrap_seed}). "
        "The other comparisons are reported without a claim.",
        "",
        "## Setup",
        "",
        f"- Phantoms: {list(p.shape)} voxels (z, y, x) at {list(p.spacing_zyx)} mm, a whole torso per crop; "
        f"classes: {', '.join(list(data.label_names.values())[1:])} (left and right lungs and kidneys are one "
        "class each). Seeds: training 2000+, validation 2500+, test 3000+.",
        f"- Network: PCT-Net, feature channels {list(ft.model.feature_channels)}, crop {list(ft.data.crop_size)}, "
        f"HU window {list(ft.data.hu_window)}, batch {ft.run.batch_size}.",
        f"- Built-in weights: `{proto.builtin}` ({card.get('steps', card.get('step'))} steps of Volume Fusion on "
        f"{card.get('pool', 'an unlabelled pool')}; pretext validation Dice "
        f"{_f3(builtin_pretext.get('mean'))}; docs/weights.md).",
        f"- Live pretraining: {pt.run.max_steps} steps on {p.pool} phantoms (seeds 1000+)"
        f"{' + the slicerio chest CT' if data.chest_ct else ''} in {pretraining.seconds:.0f} s; pretext "
        f"validation Dice {_f3(live_last.get('val_score'))} ({level_text}).",
        f"- Fine-tuning: {ft.run.max_steps} steps, lr {ft.optim.lr} ({ft.optim.schedule}, warm-up "
        f"{ft.optim.warmup_steps}), foreground ratio {ft.finetune.foreground_ratio}.",
        f"- Machine: {platform.machine()}, {cpu_count()} CPU core(s), device {device}, {workers} process(es); "
        f"total {seconds / 60:.1f} min (expected {expected / 60:.1f} min).",
        "",
        "## Dice on the held-out phantoms",
        "",
    ]
    for n, regime in summary.items():
        lines += _regime_tables(n, regime)
    lines += [
        "## Learning curves",
        "",
        "![fine-tuning curves](figures/finetune_curves.png)",
        "",
        "## Live pretraining",
        "",
        "![pretext curves](figures/pretext_curves.png)",
        "",
        "## Predictions",
        "",
        "![predictions](figures/predictions.png)",
        "",
        "## Files",
        "",
        "`report.json` holds every number above and every run's Dice per organ and phantom; "
        "`configs/{pretrain,finetune}.yaml` the resolved configs; `runs/<n>labelled/seed<S>/<arm>/` each run. "
        "Rerun one by hand:",
        "",
        "```bash",
        f"volumefusion finetune -c {out}/configs/finetune.yaml --data {data.dataset} "
        f"--split {data.splits[proto.primary]} --seed {proto.seeds[0]} --pretrained {proto.builtin} "
        f"--out {out}/rerun",
        "```",
        "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
