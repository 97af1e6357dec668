"""The embedded demo (`volumefusion demo`), its statistics, and the docs generated from the code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from volumefusion import config
from volumefusion.checkpoint import read_checkpoint
from volumefusion.config import PRESETS, ConfigError
from volumefusion.demo import ARMS, load_settings
from volumefusion.demo.data import paired_organs_merged
from volumefusion.stats import bootstrap_interval, compare_paired, holm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `volumefusion demo --quick` run through the CLI (all stages, a few steps each)."""
    from volumefusion.cli import main

    out = tmp_path_factory.mktemp("demo") / "vf-demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


def _arms(settings, n):
    return [a for a in ARMS if a in settings.protocol.arms_of(n)]


@pytest.mark.slow
def test_quick_demo_runs_every_arm_regime_and_seed_on_every_held_out_phantom(quick_demo):
    settings = load_settings(quick=True)
    results = json.loads((quick_demo / "report.json").read_text())
    cases = {p.name.removesuffix(".nii.gz") for p in (quick_demo / "data" / "test" / "labels").iterdir()}
    assert len(cases) == settings.phantoms.test
    runs = {(r["labelled"], r["seed"], r["arm"]): r for r in results["runs"]}
    assert set(runs) == {(n, s, a) for n in settings.protocol.labelled for s in settings.protocol.seeds
                         for a in _arms(settings, n)}
    assert set(ARMS) <= {a for _, _, a in runs}, "the quick demo keeps every stage"
    for (n, seed, arm), run in runs.items():
        stopped, early, budget = n in settings.protocol.stop_early, settings.early_steps(n), settings.budget(n)
        assert len(early) > 1 and early[-1] < budget
        # a run of a regime read early only stops there, on the schedule of the whole budget
        ckpt = read_checkpoint(quick_demo / "runs" / f"{n}labelled" / f"seed{seed}" / arm / "checkpoints" / "latest.pt")
        assert ckpt.step == (early[-1] if stopped else budget)
        assert [int(k) for k in run["early"]] == list(early) and bool(run["dice"]) != stopped
        for dice in ([] if stopped else [run["dice"]]) + list(run["early"].values()):
            assert set(dice) == {"lung", "heart", "aorta", "liver", "spleen", "kidney", "spine"}
            for per_case in dice.values():
                assert set(per_case) == cases and all(0.0 <= d <= 1.0 for d in per_case.values())
        for organ, per_case in run["dice"].items():
            assert run["organ_dice"][organ] == pytest.approx(np.mean(list(per_case.values())))
        assert run["early_mean_dice"] == pytest.approx(np.mean(list(run["early_curve"].values())))
        assert run["curve"], "no validation curve recorded"
    assert [(p["readout"], p["regime"]) for p in results["primary"]] == settings.protocol.hypotheses()
    gate = results["gate"]
    assert gate["mean"] == pytest.approx(np.mean(list(gate["levels"].values())))
    floors = gate["mean"] >= gate["mean_floor"] and min(gate["levels"].values()) >= gate["level_floor"]
    assert gate["passed"] == floors


@pytest.mark.slow
def test_quick_demo_arms_differ_only_in_starting_weights_and_recipe(quick_demo):
    """Arms that start from weights share one recipe; the probes hold the encoder; each arm loads
    the weights it names (the random probe an untrained copy of the built-in network)."""
    run = quick_demo / "runs" / "1labelled" / "seed0"
    configs = {arm: config.load([run / arm / "config.yaml"]) for arm in ARMS}
    assert configs["builtin"] == configs["live"] == configs["control"]
    assert configs["probe_builtin"] == configs["probe_random"]
    assert configs["probe_builtin"].finetune.freeze_encoder_steps >= configs["probe_builtin"].run.max_steps
    scratch, pretrained = config.to_dict(configs["scratch"]), config.to_dict(configs["builtin"])
    assert {k: v for k, v in scratch.items() if k not in ("optim", "finetune")} == \
        {k: v for k, v in pretrained.items() if k not in ("optim", "finetune")}
    source = {arm: json.loads((run / arm / "load_report.json").read_text())["source"]
              for arm in ARMS if arm != "scratch"}
    assert source["builtin"].endswith("demo.pt") and source["probe_builtin"].endswith("demo.pt")
    assert "runs/pretrain" in source["live"] and "runs/control" in source["control"]
    assert source["probe_random"].endswith("random_encoder.pt")
    assert not (run / "scratch" / "load_report.json").exists()
    # which phantoms are labelled is drawn from the seed, the same for every arm
    split = json.loads((quick_demo / "data" / "splits" / "1labelled_seed0.json").read_text())
    assert len(split["train"]) == 1


@pytest.mark.slow
def test_quick_demo_report_agrees_with_report_json(quick_demo):
    report = (quick_demo / "report.md").read_text()
    _assert_report_agrees(report, json.loads((quick_demo / "report.json").read_text()), load_settings(quick=True))
    assert str(quick_demo) not in report, "the report names its files relative to the demo folder"


def test_the_committed_report_agrees_with_its_report_json_and_the_demo_settings():
    docs = Path(__file__).parents[1] / "docs"
    report = (docs / "demo-report.md").read_text()
    results = json.loads((docs / "demo" / "report.json").read_text())
    assert not results["quick"] and results["settings"] == config.to_dict(load_settings())
    _assert_report_agrees(report, results, load_settings())
    assert "/work/" not in report and "/home/" not in report


def _assert_report_agrees(report: str, results: dict, settings) -> None:
    """Every per-seed and per-organ number of report.md is the one in report.json (3 decimals)."""
    sections = re.split(r"^### (\d+) labelled training phantoms?$", report, flags=re.M)
    tables = dict(zip(sections[1::2], sections[2::2]))
    assert set(tables) == set(results["regimes"])
    for n, text in tables.items():
        regime, arms = results["regimes"][n], _arms(settings, int(n))
        stopped = int(n) in settings.protocol.stop_early
        assert ("final" in regime) != stopped
        for organ in [] if stopped else regime["organ_dice"]["scratch"]:
            row = re.search(rf"^\| {organ} \|(.*)\|$", text, re.M).group(1)
            assert [float(c) for c in row.split("|")] == [round(regime["organ_dice"][a][organ], 3) for a in arms]
        for step in settings.early_steps(int(n)):
            row = re.search(rf"^\| after {step} steps \|(.*)\|$", text, re.M).group(1)
            assert [float(c) for c in row.split("|")] == [round(regime["early_curve"][a][str(step)], 3) for a in arms]
        for seed in regime["seeds"]:
            row = re.search(rf"^\| {seed} \|(.*)\|$", text, re.M).group(1)
            run = {r["arm"]: r for r in results["runs"] if (r["labelled"], r["seed"]) == (int(n), seed)}
            if stopped:
                assert [float(c) for c in row.split("|")] == [round(run[a]["early_mean_dice"], 3) for a in arms]
                continue
            cells = [re.fullmatch(r"\s*([\d.]+) \(([\d.]+)\)\s*", c).groups() for c in row.split("|")]
            assert [(float(f), float(e)) for f, e in cells] == \
                [(round(run[a]["mean_dice"], 3), round(run[a]["early_mean_dice"], 3)) for a in arms]
        for readout in ("final", "early"):
            for c in regime.get(readout, {}).get("comparisons", {}).values():
                assert f"| {c['mean_difference']:+.3f} | {c['ci_low']:+.3f} to {c['ci_high']:+.3f} |" in report
    head = report.split("## Secondary")[0]
    for c in results["primary"]:
        p = [("n/a" if v is None else f"{v:.4f}") for v in (c["p_value"], c["p_holm"])]
        assert f"{c['mean_difference']:+.3f}" in head and f"| {p[0]} | {p[1]} |" in head
    assert f"**{results['gate']['mean']:.3f}**" in report
    if results["headroom"]:
        assert f"{results['headroom']['gap']:+.3f}" in report


@pytest.mark.slow
def test_quick_demo_writes_every_picture_it_links(quick_demo):
    report = (quick_demo / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"finetune_curves.png", "pretext_curves.png", "predictions.png"} <= {Path(p).name for p in links}
    for link in links:
        path = quick_demo / link
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link


@pytest.mark.slow
def test_a_rerun_resumes_the_demo_and_redoes_only_what_is_missing(quick_demo, tmp_path, caplog):
    """A moved copy of a finished demo with one run's result and the report deleted: the same command
    runs that one run again and keeps every other result as it was, and its estimate counts that run."""
    from volumefusion.demo import run_demo

    copy = tmp_path / "moved"
    shutil.copytree(quick_demo, copy)
    lost = copy / "runs" / "1labelled" / "seed0" / "builtin"
    (lost / "result.json").unlink()
    (copy / "report.md").unlink()
    kept = {p: p.stat().st_mtime_ns for p in copy.glob("runs/**/result.json")}
    with caplog.at_level("INFO", logger="volumefusion"):
        result = run_demo(copy, quick=True, device="cpu")
    finished = len(list(copy.glob("runs/*labelled/*/*/result.json"))) - 1  # the lost one was rerun
    assert f"resuming ({finished} runs kept): 1 fine-tuning runs" in caplog.text
    assert "and 0 steps of pretraining stages" in caplog.text  # the live and control stages are kept too
    assert (lost / "result.json").is_file() and (copy / "report.md").is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    before = json.loads((quick_demo / "report.json").read_text())["runs"]
    assert [(r.labelled, r.seed, r.arm) for r in result.runs] == [(r["labelled"], r["seed"], r["arm"]) for r in before]


def test_demo_refuses_a_folder_that_holds_other_work_and_leaves_it_unchanged(tmp_path):
    from volumefusion import VolumeFusionError
    from volumefusion.demo import run_demo

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "finetune.yaml").write_text("mine\n")
    (tmp_path / "report.md").write_text("earlier")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(VolumeFusionError, match="not empty"):
        run_demo(tmp_path, quick=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_demo_refuses_a_demo_folder_of_other_settings(tmp_path):
    from volumefusion import VolumeFusionError
    from volumefusion.demo.run import claim_folder

    assert claim_folder(tmp_path / "d", load_settings(quick=True)) is False
    assert claim_folder(tmp_path / "d", load_settings(quick=True)) is True
    with pytest.raises(VolumeFusionError, match="other settings"):
        claim_folder(tmp_path / "d", load_settings(quick=True, seeds=[7]))


def test_an_interrupted_stage_stops_the_demo_with_what_to_do(tmp_path):
    from volumefusion import VolumeFusionError
    from volumefusion.demo.run import _finished
    from volumefusion.train.engine import FitResult

    _finished(FitResult(step=6), "the live pretraining", tmp_path)
    with pytest.raises(VolumeFusionError, match="stopped at step 1 .*rerun the same demo command"):
        _finished(FitResult(step=1, interrupted="SIGINT"), "the live pretraining", tmp_path)


def test_settings_fix_the_protocol_and_quick_and_study_override_it():
    full, quick, study = load_settings(), load_settings(quick=True), load_settings(study=True)
    proto = full.protocol
    # round three: (a) 8 labelled, early; (b) 1 labelled, final; 8 seeds none of which round two reported
    assert proto.hypotheses() == [("early", 8), ("final", 1)] and proto.stop_early == (8,)
    assert (full.budget(8), full.early_steps(8), full.budget(1)) == (1200, (150, 300), 600)
    assert len(proto.seeds) == 8 and not set(proto.seeds) & set(range(6)) and full.phantoms.seed_offset == 70000
    assert set(study.protocol.labelled) > set(proto.labelled) and not study.protocol.stop_early
    assert {"control", "probe_builtin", "probe_random"} <= set(study.protocol.arms_of(1))
    assert quick.finetune_run_config().run.max_steps < full.finetune_run_config().run.max_steps
    # every arm and the live pretraining share the built-in weights' architecture and intensities
    builtin = full.pretrain_run_config()
    for s in (full, quick):
        assert s.finetune_run_config().model == builtin.model
        assert s.finetune_run_config().data.hu_window == builtin.data.hu_window
    assert load_settings(seeds=[11, 12]).protocol.seeds == (11, 12)


@pytest.mark.parametrize("edit, field", [
    (("labelled: [8, 1] ", "labelled: [1, 9] "), "protocol.labelled"),
    (("    max_steps: 1200", "    max_stepz: 1200"), "finetune.run.max_stepz"),
    (("arms: [scratch, builtin]  ", "arms: [scratch, kontrol]  "), "protocol.arms"),
    (("stop_early: [8]", "stop_early: [1]"), "protocol.stop_early"),
    (("steps: [1200, 600]", "steps: [1200]"), "protocol.steps"),
    (("primary_early: 8", "primary_early: 2"), "protocol.primary_early"),
    (("alternative: greater", "alternative: less"), "protocol.alternative"),
    (("pool: 24", "pool: many"), "phantoms.pool"),
    (("{lr: 3.0e-3", "{lr: fast"), "scratch.optim.lr"),
    (("pretrain_config: pretrain_demo", "pretrain_config: pretrain_demo\nextra: 1"), "extra"),
])
def test_bad_demo_settings_name_the_field(tmp_path, edit, field):
    text = (PRESETS / "demo.yaml").read_text()
    assert edit[0] in text
    path = tmp_path / "demo.yaml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_settings(path)


def test_paired_organs_become_one_class():
    from volumefusion.data.phantoms import LABEL_NAMES

    names, table = paired_organs_merged(LABEL_NAMES)
    assert names[0] == "background" and table[0] == 0
    lung = [v for v, n in names.items() if n == "lung"][0]
    by_name = {n: v for v, n in LABEL_NAMES.items()}
    assert table[by_name["lung_right"]] == table[by_name["lung_left"]] == lung
    assert sorted(set(table.tolist())) == list(range(len(names)))
    assert len(names) == len(LABEL_NAMES) - 2


def _comparison(low, high):
    return {"mean_difference": (low + high) / 2, "ci_low": low, "ci_high": high, "p_value": 0.5}


@pytest.mark.parametrize("gate_mean, control, probe, room_passed, implied", [
    (0.4, (0.02, 0.06), (0.01, 0.05), True, "have not learned their pretext"),
    (0.7, (-0.01, 0.02), (0.01, 0.05), False, "too little room"),
    (0.7, (-0.01, 0.02), (0.01, 0.05), True, "did not detect even supervised transfer"),
    (0.7, (0.02, 0.06), (0.01, 0.05), False, "learned useful features"),
    # the positive control shows the room, whatever the headroom rule said
    (0.7, (0.02, 0.06), (-0.13, -0.07), False, "The pretraining, not the benchmark"),
    (0.7, (0.02, 0.06), (-0.03, 0.02), True, "did not help here"),
])
def test_what_held_draws_the_implication_from_gate_control_probe_and_headroom(
        gate_mean, control, probe, room_passed, implied):
    from volumefusion.demo.report import _what_held
    from volumefusion.demo.results import GateResult

    settings = load_settings(None, False, None)
    gate = GateResult({"a0": gate_mean, "a1": gate_mean}, gate_mean, 0.6, 0.3, 64, 32)
    held = {"gap": True, "full": room_passed, "organs": room_passed}
    room = {"gap": 0.16, "full_mean": 0.78, "full_organs": {"aorta": 0.58, "lung": 0.94}, "held": held,
            "passed": room_passed}
    summary = {str(settings.protocol.primary_final): {"final": {"comparisons": {
        "control - scratch": _comparison(*control), "probe_builtin - probe_random": _comparison(*probe)}}}}
    lines = _what_held(gate, room, summary, [{"readout": "final", "significant": False}], settings)
    assert implied in lines[-1] and lines[-1].startswith("- So:"), lines
    assert "gap +0.160 held" in lines[1] and f"full set 0.780 {'held' if room_passed else 'not'}" in lines[1]
    # where nothing that could explain the result was measured (the main demo), nothing is implied
    lines = _what_held(gate, {}, {}, [{"readout": "final", "significant": False}], settings)
    assert any("--study" in line for line in lines)
    assert any(line.startswith("- So:") for line in lines) == (not gate.passed)


def test_wilcoxon_p_is_exact_and_one_sided_when_asked():
    scratch = [0.50, 0.52, 0.48, 0.51, 0.49, 0.50]
    better = [s + d for s, d in zip(scratch, (0.01, 0.02, 0.03, 0.04, 0.05, 0.06))]
    c = compare_paired(scratch, better, alternative="greater")
    assert c.p_value == pytest.approx(1 / 64) and c.wins == 6 and c.n == 6
    assert compare_paired(scratch, better, alternative="two-sided").p_value == pytest.approx(2 / 64)
    # one loss on the smallest difference: W- = 1, two of 64 sign patterns are at least as extreme
    mixed = [s + d for s, d in zip(scratch, (-0.01, 0.02, 0.03, 0.04, 0.05, 0.06))]
    assert compare_paired(scratch, mixed, alternative="greater").p_value == pytest.approx(2 / 64)
    assert c.mean_difference == pytest.approx(0.035)


def test_holm_adjusts_the_smallest_p_most_and_keeps_the_order():
    assert holm([0.01, 0.04]) == pytest.approx([0.02, 0.04])
    assert holm([0.03, 0.02]) == pytest.approx([0.04, 0.04])  # never below a smaller p's adjusted value
    assert holm([0.6, None, 0.001]) == pytest.approx([0.6, None, 0.002])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean():
    values = [0.01, 0.05, -0.02, 0.04, 0.03, 0.02]
    low, high = bootstrap_interval(values, 5000, seed=0)
    assert (low, high) == bootstrap_interval(values, 5000, seed=0)
    assert low < np.mean(values) < high
    assert min(values) <= low and high <= max(values)
    assert bootstrap_interval([0.1] * 4, 100, seed=3) == pytest.approx((0.1, 0.1))


def test_builtin_weights_load_with_every_encoder_tensor_matched():
    """`builtin:demo` resolves to the shipped file, is small, and fills every encoder tensor of the
    demo's fine-tuning network (only the class-dependent outputs start fresh)."""
    import torch

    from volumefusion.checkpoint import load_checkpoint, resolve_weights
    from volumefusion.nets import build_model
    from volumefusion.weights import load_pretrained

    path = resolve_weights("builtin:demo")
    assert path.stat().st_size <= 10 * 2**20
    ckpt = load_checkpoint(path)
    assert ckpt["task"]["kind"] == "pretrain" and ckpt["card"]["command"]
    cfg = load_settings().finetune_run_config()
    model = build_model(cfg.model, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, path)  # strict by default: only the output layers may stay fresh
    encoder = [k for k in model.state_dict() if k.startswith(tuple(model.encoder_prefixes))]
    assert encoder and set(encoder) <= set(report.loaded)
    assert all(k.startswith(tuple(model.head_prefixes)) for k in report.missing + [s[0] for s in report.shape_skipped])
    state = model.state_dict()
    changed = [k for k in encoder if state[k].is_floating_point() and not torch.equal(state[k], before[k])]
    assert len(changed) > len(encoder) // 2, "the weights did not change the network"


def test_unknown_builtin_weights_name_the_available_ones():
    from volumefusion import VolumeFusionError
    from volumefusion.checkpoint import resolve_weights

    with pytest.raises(VolumeFusionError, match="builtin:demo"):
        resolve_weights("builtin:nope")


def test_user_guide_lists_every_config_field_as_the_code_describes_it():
    from volumefusion.config import describe_fields

    guide = (ROOT / "docs" / "user-guide.md").read_text()
    pattern = r"<!-- config-fields:.*?-->\n```text\n(.*?)\n```\n<!-- end config-fields -->"
    section = re.search(pattern, guide, re.S)
    assert section, "docs/user-guide.md lost its generated config-fields section"
    assert section.group(1) == describe_fields(), (
        "config fields changed: regenerate docs/user-guide.md's section from `volumefusion config --fields`")


def test_docs_link_only_to_files_that_exist():
    for doc in ("user-guide.md", "method.md", "demo-report.md", "weights.md"):
        path = ROOT / "docs" / doc
        if not path.exists():
            continue
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{doc} links to missing {target}"
