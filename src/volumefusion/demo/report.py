"""The demo's report: ``report.md`` for people, ``report.json`` with every number for programs, and
the pictures in ``figures/``.

Numbers: a run's score is the mean over organs of its mean Dice over the held-out phantoms. Each
regime compares every arm with ``scratch`` seed by seed (the probes with each other), at the end of
the fine-tuning budget and at the early readout (:mod:`volumefusion.stats`). Before the test
come its preconditions: the gate (can the built-in weights do their pretext task on phantoms they
never saw?) and the headroom (do more labels help the model from scratch, so that there is a gain
to be had?). Every path the report names is relative to the demo's folder.
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from volumefusion.checkpoint import read_checkpoint
from volumefusion.config import to_dict
from volumefusion.demo.data import DemoData
from volumefusion.demo.results import GateResult, PretrainResult, RunResult, run_folder
from volumefusion.demo.settings import ARMS, DemoSettings
from volumefusion.files import atomic_write_text
from volumefusion.io import read_image
from volumefusion.processes import cpu_count
from volumefusion.stats import compare_paired, holm
from volumefusion.viz import label_overlay, save_band_curves, save_curves, save_montage

READOUT = {"final": "mean_dice", "early": "early_mean_dice"}
VARIED = ", scans varied (size, pose, field of view, contrast phase, missing organs, lesions, noise)"


def _f3(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.4f}"


def _plural(n: int | str, word: str = "phantom") -> str:
    return f"{n} labelled {word}{'s' if int(n) > 1 else ''}"


def summarise(settings: DemoSettings, runs: list[RunResult]) -> dict:
    """Per regime: the arms run, mean Dice (final, unless the regime stops early, and early) and
    per-organ Dice of each arm (means over seeds), per-seed mean Dice, and the paired comparisons of
    each arm with its baseline."""
    proto = settings.protocol
    out = {}
    for n in proto.labelled:
        arms = [a for a in ARMS if a in proto.arms_of(n)]
        per = {(r.seed, r.arm): r for r in runs if r.labelled == n}
        seeds = [s for s in proto.seeds if all((s, a) in per for a in arms)]
        if not seeds:
            continue
        first = per[seeds[0], arms[0]]
        regime = {"arms": arms, "seeds": seeds, "budget": settings.budget(n), "early_step": first.early_step,
                  "early_steps": sorted(map(int, first.early)), "stopped": n in proto.stop_early}
        for readout, attr in READOUT.items():
            if readout == "final" and regime["stopped"]:
                continue
            by_seed = {a: [getattr(per[s, a], attr) for s in seeds] for a in arms}
            regime[readout] = {
                "mean_dice": {a: float(np.mean(by_seed[a])) for a in arms},
                "sd_dice": {a: float(np.std(by_seed[a], ddof=1)) if len(seeds) > 1 else None for a in arms},
                "seed_mean_dice": {a: dict(zip(map(str, seeds), by_seed[a])) for a in arms},
                "comparisons": {f"{a} - {ARMS[a].baseline}": compare_paired(
                    by_seed[ARMS[a].baseline], by_seed[a], alternative=proto.alternative, resamples=proto.bootstrap,
                    seed=proto.bootstrap_seed).to_dict() for a in arms if ARMS[a].baseline in arms},
            }
        organs = list(first.organ_dice)
        regime["organ_dice"] = {a: {o: float(np.mean([per[s, a].organ_dice[o] for s in seeds])) for o in organs}
                                for a in arms}
        early = sorted(first.early, key=int)
        regime["early_curve"] = {a: {t: float(np.mean([per[s, a].early_curve[t] for s in seeds])) for t in early}
                                 for a in arms}
        out[str(n)] = regime
    return out


def headroom(settings: DemoSettings, summary: dict) -> dict:
    """From scratch: the regime of the final primary test against the full label set (the most
    labelled phantoms); empty where either has no final readout."""
    proto = settings.protocol
    full, few = summary.get(str(max(proto.labelled))), summary.get(str(proto.primary_final))
    if full is None or few is None or full is few or "final" not in full or "final" not in few:
        return {}
    full_mean, few_mean = full["final"]["mean_dice"]["scratch"], few["final"]["mean_dice"]["scratch"]
    organs = full["organ_dice"]["scratch"]
    held = {"gap": full_mean - few_mean >= proto.headroom_gap, "full": full_mean >= proto.headroom_full,
            "organs": min(organs.values()) >= proto.headroom_organ}
    return {"primary": proto.primary_final, "full": max(proto.labelled), "primary_mean": few_mean,
            "full_mean": full_mean, "gap": full_mean - few_mean, "full_organs": organs, "held": held,
            "passed": all(held.values())}


def _primary(settings: DemoSettings, summary: dict) -> list[dict]:
    """The primary tests (builtin vs scratch: (a) early readout, (b) final), Holm-adjusted together;
    a test whose regime has no complete seed is left out."""
    proto = settings.protocol
    tests = []
    for readout, n in proto.hypotheses():
        block = summary.get(str(n), {}).get(readout)
        if block:
            tests.append({"regime": n, "readout": readout, "comparison": "builtin - scratch",
                          "alternative": proto.alternative, "alpha": proto.alpha,
                          **block["comparisons"]["builtin - scratch"],
                          "builtin": block["mean_dice"]["builtin"], "scratch": block["mean_dice"]["scratch"]})
    for test, p in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_holm"] = p
        test["significant"] = p is not None and p < proto.alpha
    return tests


def _when(readout: str, regime: dict) -> str:
    """The readout in words: at the end of the budget, or over the early steps."""
    if readout == "final":
        return f"at the end of the budget ({regime['budget']} steps)"
    steps = regime["early_steps"]
    if len(steps) == 1:
        return f"after {steps[0]} steps"
    return f"over the first {steps[-1]} steps, the mean of the scores after {_and(steps)} steps"


def _and(items) -> str:
    """``1, 2 and 3``."""
    items = [str(i) for i in items]
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _verdict(settings: DemoSettings, primary: list[dict], summary: dict) -> str:
    proto = settings.protocol
    if not primary:
        return "No complete seed in a primary regime."
    side = "one-sided, built-in better" if proto.alternative == "greater" else "two-sided"
    sentences = []
    for c in primary:
        what = ("Faster convergence" if c["readout"] == "early" else "Few labels") + \
            f", {_plural(c['regime'])}, {_when(c['readout'], summary[str(c['regime'])])}"
        sentences.append(
            f"{what}: the built-in Volume Fusion weights reached a held-out mean Dice of {c['builtin']:.3f} against "
            f"{c['scratch']:.3f} from scratch over {_seeds(c['n'])}, paired difference {c['mean_difference']:+.3f} "
            f"(95 % bootstrap interval {c['ci_low']:+.3f} to {c['ci_high']:+.3f}; Wilcoxon signed-rank p = "
            f"{_p(c['p_value'])}, {side}, Holm-adjusted {_p(c['p_holm'])}; better on {c['wins']} of {c['n']} "
            f"seeds): {'a significant gain' if c['significant'] else 'not a significant gain'} by the protocol "
            "fixed in advance.")
    return " ".join(sentences)


def _comparison_row(name: str, c: dict, means: dict) -> str:
    a, b = name.split(" - ")
    return (f"| {ARMS[a].text} vs {ARMS[b].text} | {_f3(means[a])} | {_f3(means[b])} | {c['mean_difference']:+.3f} | "
            f"{c['ci_low']:+.3f} to {c['ci_high']:+.3f} | {_p(c['p_value'])} | {c['wins']} of {c['n']} |")


_COMPARISON_HEAD = ["| comparison | mean | baseline mean | difference | 95 % bootstrap interval | Wilcoxon p | "
                    "better on |", "| --- | ---: | ---: | ---: | :---: | ---: | ---: |"]


def _secondary(settings: DemoSettings, summary: dict) -> list[str]:
    """Every comparison but the primary ones: other readouts, probes, control, live, other regimes."""
    primary = {(readout, n) for readout, n in settings.protocol.hypotheses()}
    lines = _COMPARISON_HEAD.copy()
    for n, regime in summary.items():
        for readout in READOUT:
            block = regime.get(readout, {})
            for name, c in block.get("comparisons", {}).items():
                if (readout, int(n)) in primary and name == "builtin - scratch":
                    continue
                when = f"early ({regime['early_steps'][-1]} steps)" if readout == "early" else "final"
                row = _comparison_row(name, c, block["mean_dice"])
                lines.append(row.replace("| ", f"| {_plural(n)}, {when}: ", 1))
    return lines


def _what_held(gate: GateResult, room: dict, summary: dict, primary: list[dict], settings: DemoSettings
               ) -> list[str]:
    """Which preconditions and controls held, and what that implies for a non-significant final test."""
    regime = summary.get(str(settings.protocol.primary_final), {}).get("final", {}).get("comparisons", {})
    probe, control = regime.get("probe_builtin - probe_random"), regime.get("control - scratch")
    lines = [f"- Gate (the pretext is learned): {'held' if gate.passed else 'did not hold'} (mean {gate.mean:.3f}, "
             f"lowest level {min(gate.levels.values()):.3f})."]
    if room:
        parts = {"gap": f"gap {room['gap']:+.3f}", "full": f"full set {room['full_mean']:.3f}",
                 "organs": f"lowest organ {min(room['full_organs'].values()):.3f}"}
        said = "; ".join(f"{text} {'held' if room['held'][k] else 'not'}" for k, text in parts.items())
        lines.append(f"- Headroom (labels limit the model from scratch): {'held' if room['passed'] else 'did not hold'}"
                     f" ({said}).")
    if probe:
        lines.append(f"- Frozen-encoder probe (the pretraining learned useful features): built-in minus random "
                     f"encoder {probe['mean_difference']:+.3f} (interval {probe['ci_low']:+.3f} to "
                     f"{probe['ci_high']:+.3f}).")
    if control:
        lines.append(f"- Positive control (the set-up detects transfer): control minus scratch "
                     f"{control['mean_difference']:+.3f} (interval {control['ci_low']:+.3f} to "
                     f"{control['ci_high']:+.3f}, p = {_p(control['p_value'])}).")
    unmeasured = not probe and not control and not room
    if unmeasured:
        lines.append("- Headroom, probe and positive control: not measured in this mode (`volumefusion demo --study` "
                     "measures them).")
    if all(c["significant"] for c in primary if c["readout"] == "final") or (unmeasured and gate.passed):
        return lines  # nothing to explain, or nothing measured that could explain it
    detects = control is not None and control["ci_low"] > 0
    features = probe is not None and probe["ci_low"] > 0
    worse = probe is not None and probe["ci_high"] < 0
    # the positive control measures the room for a gain directly, so it outranks the headroom rule
    if not gate.passed:
        lines.append("- So: the built-in weights have not learned their pretext; pretrain them longer before "
                     "reading anything into the comparison.")
    elif not detects and room and not room["passed"]:
        lines.append("- So: the benchmark leaves too little room for any initialisation to gain.")
    elif not detects:
        lines.append("- So: this set-up did not detect even supervised transfer; it cannot show a gain of "
                     "self-supervised pretraining either.")
    elif features:
        lines.append("- So: the encoder learned useful features and the set-up detects transfer, but fine-tuning "
                     "the whole network did not turn them into a significant gain at this budget.")
    elif worse:
        lines.append("- So: there is room for a gain and the set-up detects one (the positive control), but the "
                     "frozen Volume Fusion encoder is worse than a random one for this task: the pretext is "
                     "learned, yet its features do not serve segmentation. The pretraining, not the benchmark, "
                     "is what fails here.")
    else:
        lines.append("- So: the set-up detects transfer, but the Volume Fusion features did not help here.")
    return lines


def _regime_tables(n: str, regime: dict) -> list[str]:
    arms, final, early = regime["arms"], regime.get("final"), regime["early"]
    lines = [f"### {_plural(n, 'training phantom')}", ""]
    if final:
        m, sd = final["mean_dice"], final["sd_dice"]
        lines += ["| organ | " + " | ".join(ARMS[a].text for a in arms) + " |", "| --- |" + " ---: |" * len(arms)]
        for organ in regime["organ_dice"][arms[0]]:
            lines.append(f"| {organ} | " + " | ".join(_f3(regime["organ_dice"][a][organ]) for a in arms) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{_f3(m[a])}**" + (f" ± {sd[a]:.3f}" if sd[a] is not None
                                                                         else "") for a in arms) + " |")
    else:
        lines += [f"The runs stop at step {regime['early_step']} (the early readout).", "",
                  "| mean Dice | " + " | ".join(ARMS[a].text for a in arms) + " |", "| --- |" + " ---: |" * len(arms)]
    for step in regime["early_steps"]:
        lines.append(f"| after {step} steps | " + " | ".join(_f3(regime["early_curve"][a][str(step)]) for a in arms)
                     + " |")
    lines.append("| early readout | " + " | ".join(_f3(early["mean_dice"][a]) for a in arms) + " |")
    head = "final; the early readout in brackets" if final else "the early readout"
    lines += ["", f"Mean Dice per seed ({head}):", "",
              "| seed | " + " | ".join(arms) + " |", "| --- |" + " ---: |" * len(arms)]
    for s in regime["seeds"]:
        cells = [f"{_f3(final['seed_mean_dice'][a][str(s)])} ({_f3(early['seed_mean_dice'][a][str(s)])})"
                 if final else _f3(early["seed_mean_dice"][a][str(s)]) for a in arms]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
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
                group[ARMS[arm].text] = (steps, np.array([[v for _, v in c[:length]] for c in curves]))
        panels[_plural(n)] = group
    return save_band_curves(path, panels, ylabel="validation mean Dice",
                            title="fine-tuning: mean over seeds, band = min to max")


def _pretext_figure(pretraining: PretrainResult, path: Path) -> Path | None:
    """Pretext validation Dice of the live pretraining, overall and per fusion level."""
    records = pretraining.validation
    if not records:
        return None
    levels = sorted(k for k in records[0] if k.startswith("val_dice_a"))
    series = {"mean": [(r["step"], r["val_score"]) for r in records]}
    series.update({k.removeprefix("val_dice_"): [(r["step"], r[k]) for r in records] for k in levels})
    return save_curves(path, {"pretext validation Dice (live pretraining)": series})


def _predictions_figure(out: Path, data: DemoData, settings: DemoSettings, path: Path) -> Path:
    """Two held-out phantoms: image, truth and each arm's prediction (first seed, primary regime)."""
    proto = settings.protocol
    seed, n = proto.seeds[0], _final_regime(settings)
    arms = [a for a in ARMS if a in proto.arms_of(n)]
    cases = sorted(p.name for p in data.test_labels.glob("*.nii.gz"))[:2]
    rows: dict[str, list] = {"image": [], "truth": [], **{ARMS[a].text: [] for a in arms}}
    columns = []
    for case in cases:
        image, _ = read_image(data.test_images / case)
        truth, _ = read_image(data.test_labels / case)
        where = Path("early") / f"step{settings.trained_steps(n)}" if n in proto.stop_early else Path()
        preds = {a: read_image(run_folder(out, n, seed, a) / where / "predictions" / case)[0] for a in arms}
        for frac in (0.3, 0.7):  # one slice through the abdomen, one through the chest
            z = int(round(frac * (image.shape[0] - 1)))
            columns.append(f"{case.removesuffix('.nii.gz')}, z={z}")
            rows["image"].append(np.clip((image[z] + 200) / 500, 0, 1))
            rows["truth"].append(label_overlay(image[z], truth[z], 0.5, (-200, 300)))
            for a in arms:
                rows[ARMS[a].text].append(label_overlay(image[z], preds[a][z], 0.5, (-200, 300)))
    names = [data.label_names.get(i, str(i)) for i in range(max(data.label_names) + 1)]
    return save_montage(path, [(k, v, "image") for k, v in rows.items()], col_titles=columns, window=(0, 1),
                        label_names=names, cell=1.9,
                        title=f"held-out phantoms, {_plural(n)}, seed {seed} (window -200..300 HU)")


def _final_regime(settings: DemoSettings) -> int:
    """The regime whose runs the report shows and names: that of the final primary test, or else the
    first that runs to the end of the budget."""
    proto = settings.protocol
    return proto.primary_final or next((n for n in proto.labelled if n not in proto.stop_early), proto.labelled[0])


def _builtin_card(path: Path) -> dict:
    """What the built-in checkpoint says about itself (its ``card``, written with the weights)."""
    ckpt = read_checkpoint(path)
    return {"step": ckpt.step, **ckpt.card}


def _tried() -> list[str]:
    """The table of what was tried on the way to this protocol (shipped beside the settings)."""
    text = resources.files("volumefusion.demo").joinpath("tried.md")
    return text.read_text().strip().splitlines() + [""] if text.is_file() else []


def _relative(path: Path, out: Path) -> str:
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def write_report(out: Path, settings: DemoSettings, data: DemoData, gate: GateResult,
                 pretraining: dict[str, PretrainResult], runs: list[RunResult], builtin: Path, *, device: str,
                 quick: bool, study: bool = False, workers: int, seconds: float, expected: float) -> Path:
    """``out/report.md``, ``out/report.json`` and ``out/figures/*.png``; returns the report's path."""
    figures = out / "figures"
    summary = summarise(settings, runs)
    primary = _primary(settings, summary)
    room = headroom(settings, summary)
    work = sum(r.seconds for r in runs) + sum(r.seconds for r in pretraining.values())
    _curves_figure(settings, runs, figures / "finetune_curves.png")
    live = pretraining.get("live")
    if live and _pretext_figure(live, figures / "pretext_curves.png") and (live.run_dir / "progress.png").is_file():
        shutil.copyfile(live.run_dir / "progress.png", figures / "pretrain_progress.png")
    _predictions_figure(out, data, settings, figures / "predictions.png")
    card = _builtin_card(builtin)
    p, proto = settings.phantoms, settings.protocol
    ft, ft_pre, pt = (settings.finetune_run_config("scratch"), settings.finetune_run_config("builtin"),
                      settings.pretrain_run_config())
    control_cfg = settings.control_run_config()
    results = {
        "quick": quick, "study": study, "device": device, "workers": workers, "cpu_cores": cpu_count(),
        "seconds": seconds, "process_seconds": work, "expected_seconds": expected,
        "settings": to_dict(settings), "gate": gate.to_dict(), "headroom": room, "primary": primary,
        "regimes": summary,
        "pretraining": {"builtin": card, **{k: {"seconds": v.seconds, "steps": v.steps, "validation": v.validation}
                                            for k, v in pretraining.items()}},
        "runs": [r.to_dict() for r in runs],
    }
    atomic_write_text(out / "report.json", json.dumps(results, indent=1) + "\n")

    arms = {a for n in proto.labelled for a in proto.arms_of(n)}
    shown = _final_regime(settings)
    rel = {k: _relative(v, out) for k, v in (("dataset", data.dataset), ("split", data.split(shown, proto.seeds[0])))}
    title = " (--quick: a smoke run, too short to mean anything)" if quick else " (--study)" if study else ""
    lines = [
        f"# volumefusion demo report{title}",
        "",
        f"**Result.** {_verdict(settings, primary, summary)}",
        "",
        "## Preconditions",
        "",
        f"**Gate: is the pretext learned?** Pretext Dice of `{proto.builtin}` on {gate.samples} fused crops of "
        f"{gate.phantoms} phantoms no pretraining saw (its own crop size and fusion settings); the gate asks for a "
        f"mean of at least {gate.mean_floor} and no fusion level below {gate.level_floor}: "
        f"**{'passed' if gate.passed else 'not passed'}**.",
        "",
        "| fusion level | " + " | ".join(f"{k} (alpha {int(k[1:]) / (len(gate.levels) - 1):.2f})"
                                         for k in gate.levels) + " | mean |",
        "| --- |" + " ---: |" * (len(gate.levels) + 1),
        "| pretext Dice | " + " | ".join(f"{v:.3f}" for v in gate.levels.values()) + f" | **{gate.mean:.3f}** |",
        "",
    ]
    if room:
        lines += [
            f"**Headroom: is there room for a gain?** From scratch, {_plural(room['primary'])} reached "
            f"{room['primary_mean']:.3f} and the full set of {room['full']} reached {room['full_mean']:.3f}: a gap of "
            f"{room['gap']:+.3f} (asked: at least {proto.headroom_gap}), the full set at least "
            f"{proto.headroom_full} ({'yes' if room['held']['full'] else 'no'}) with every organ at least "
            f"{proto.headroom_organ} (lowest {min(room['full_organs'].values()):.3f}, "
            f"{'yes' if room['held']['organs'] else 'no'}): **{'passed' if room['passed'] else 'not passed'}**.",
            "",
        ]
    lines += ["## The pre-registered tests", "",
              f"Holm's correction across the {len(proto.hypotheses())} tests, at level {proto.alpha}.", "",
              _COMPARISON_HEAD[0].replace(" better on |", " Holm-adjusted p | better on |"),
              _COMPARISON_HEAD[1] + " ---: |"]
    for c in primary:
        row = _comparison_row("builtin - scratch", c, {"builtin": c["builtin"], "scratch": c["scratch"]})
        row = row.replace("| built-in", f"| {_plural(c['regime'])}, {c['readout']}: built-in", 1)
        head, wins = row.rsplit(" | ", 1)
        lines.append(f"{head} | {_p(c['p_holm'])} | {wins}")
    lines += ["", "## Secondary readouts (reported without a claim)", "", *_secondary(settings, summary), "",
              "## What held", "", *_what_held(gate, room, summary, primary, settings), ""]
    tests = "; ".join(f"({'ab'[i]}) {_plural(n)}, {'the early readout' if r == 'early' else 'final weights'}"
                      for i, (r, n) in enumerate(proto.hypotheses()))
    stopped = [n for n in proto.labelled if n in proto.stop_early]
    lines += [
        "## Protocol (fixed in the demo settings before any result)",
        "",
        f"- Arms ({_plural(shown)}): {', '.join(ARMS[a].text for a in proto.arms_of(shown))}; other regimes: "
        f"{', '.join(ARMS[a].text for a in proto.other_arms)}. Within a regime and seed every arm sees the same "
        "labelled phantoms, seed, data order and augmentation; they differ in their starting weights and "
        "recipe (scratch or pretrained).",
        f"- Regimes: {', '.join(map(str, proto.labelled))} labelled training phantom(s) of {p.train}; which "
        f"ones are labelled is drawn from the seed. Seeds {list(proto.seeds)}. Every run is scored on the same "
        f"{p.test} held-out phantoms (mean over organs of the per-organ Dice averaged over phantoms), with its "
        f"final weights and, as the early readout, with the mean of its scores at evenly spaced steps up to "
        f"{proto.early_fraction:g} of the budget (one jagged evaluation moves it less than a single score). "
        "Budgets and early steps: " + "; ".join(
            f"{_plural(n)}: {settings.budget(n)} steps, early {_and(settings.early_steps(n))}"
            + (" (the runs stop there, on the schedule of the whole budget, and are read early only)"
               if n in stopped else "") for n in proto.labelled) + ".",
        f"- Tests: {tests}; builtin - scratch mean Dice, paired Wilcoxon signed-rank, exact, alternative "
        f"`{proto.alternative}`, Holm's correction across them at level {proto.alpha}; 95 % percentile bootstrap "
        f"interval of the mean paired difference ({proto.bootstrap} resamples, seed {proto.bootstrap_seed}). "
        "The other comparisons are reported without a claim.",
        "",
        "## Setup",
        "",
        f"- Phantoms: {list(p.shape)} voxels (z, y, x) at {list(p.spacing_zyx)} mm{VARIED if p.vary else ''}; "
        f"classes: {', '.join(list(data.label_names.values())[1:])} (left and right lungs and kidneys are one "
        f"class each). Seeds (+ offset {p.seed_offset}): training 2000+, validation 2500+, test 3000+, control "
        "4000+, gate 9000+.",
        f"- Network: PCT-Net, feature channels {list(ft.model.feature_channels)}, fine-tuning crop "
        f"{list(ft.data.crop_size)}, HU window {list(ft.data.hu_window)}, batch {ft.run.batch_size}.",
        f"- Built-in weights: `{proto.builtin}` ({card.get('steps', card.get('step'))} steps of Volume Fusion; "
        "docs/weights.md).",
        f"- Recipes: scratch lr {ft.optim.lr} ({ft.optim.schedule}, warm-up {ft.optim.warmup_steps}); "
        f"pretrained lr {ft_pre.optim.lr} ({ft_pre.optim.schedule}, warm-up {ft_pre.optim.warmup_steps}, encoder "
        f"held for {ft_pre.finetune.freeze_encoder_steps} steps)"
        + ("; probes: encoder held for the whole run" if {"probe_builtin", "probe_random"} & arms else "")
        + (f"; positive control: {control_cfg.run.max_steps} steps of supervised training on {p.control - 1} "
           "control phantoms, then the pretrained recipe" if "control" in arms else "") + ".",
        f"- Machine: {platform.machine()}, {cpu_count()} CPU core(s), device {device}, {workers} process(es); "
        f"the runs and stages took {work / 60:.0f} min of process time, about {work / workers / 60:.0f} min on "
        f"{workers} process(es); this invocation {seconds / 60:.1f} min (expected {expected / 60:.1f} min"
        f"{', finished runs kept from an earlier one' if seconds < 0.8 * work / workers else ''}).",
        "",
        "## Dice on the held-out phantoms, every seed",
        "",
    ]
    for n, regime in summary.items():
        lines += _regime_tables(n, regime)
    lines += ["## Learning curves", "", "![fine-tuning curves](figures/finetune_curves.png)", ""]
    if live:
        last = live.validation[-1] if live.validation else {}
        lines += ["## Live pretraining", "",
                  f"{pt.run.max_steps} steps on {p.pool} phantoms{' + the slicerio chest CT' if data.chest_ct else ''} "
                  f"in {live.seconds:.0f} s; pretext validation Dice {_f3(last.get('val_score'))}.", "",
                  "![pretext curves](figures/pretext_curves.png)", ""]
    lines += ["## Predictions", "", "![predictions](figures/predictions.png)", "", *_tried(),
              "## Files", "",
              "`report.json` holds every number above and every run's Dice per organ and phantom; `configs/` the "
              "resolved configs of each recipe; `runs/<n>labelled/seed<S>/<arm>/` each run; `gate.json` the gate. "
              "Rerun one run by hand, from the demo folder:",
              "",
              "```bash",
              f"volumefusion finetune -c configs/finetune_pretrained.yaml --data {rel['dataset']} "
              f"--split {rel['split']} --seed {proto.seeds[0]} --max-steps {settings.budget(shown)} "
              f"--pretrained {proto.builtin} --out rerun",
              "```",
              ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
