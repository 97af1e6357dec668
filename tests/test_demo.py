"""The embedded demo (`volumefusion demo`), its statistics, and the docs generated from the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from volumefusion.config import PRESETS, ConfigError
from volumefusion.demo import ARMS, load_settings
from volumefusion.demo.data import paired_organs_merged
from volumefusion.demo.stats import bootstrap_interval, compare_paired

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `volumefusion demo --quick` run through the CLI (all stages, a few steps each)."""
    from volumefusion.cli import main

    out = tmp_path_factory.mktemp("demo") / "vf-demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_quick_demo_runs_every_arm_regime_and_seed_on_every_held_out_phantom(quick_demo):
    settings = load_settings(quick=True)
    results = json.loads((quick_demo / "report.json").read_text())
    cases = {p.name.removesuffix(".nii.gz") for p in (quick_demo / "data" / "test" / "labels").iterdir()}
    assert len(cases) == settings.phantoms.test
    runs = {(r["labelled"], r["seed"], r["arm"]): r for r in results["runs"]}
    assert set(runs) == {(n, s, a) for n in settings.protocol.labelled for s in settings.protocol.seeds for a in ARMS}
    for run in runs.values():
        assert set(run["dice"]) == {"lung", "heart", "aorta", "liver", "spleen", "kidney", "spine"}
        for organ, per_case in run["dice"].items():
            assert set(per_case) == cases and all(0.0 <= d <= 1.0 for d in per_case.values())
            assert run["organ_dice"][organ] == pytest.approx(np.mean(list(per_case.values())))
        assert run["curve"], "no validation curve recorded"


@pytest.mark.slow
def test_quick_demo_arms_differ_only_in_starting_weights(quick_demo):
    run = quick_demo / "runs" / "1labelled" / "seed0"
    configs = {arm: (run / arm / "config.yaml").read_text() for arm in ARMS}
    assert configs["scratch"] == configs["builtin"] == configs["live"]
    builtin = json.loads((run / "builtin" / "load_report.json").read_text())
    live = json.loads((run / "live" / "load_report.json").read_text())
    assert builtin["source"].endswith("demo.pt") and "runs/pretrain" in live["source"]
    assert not (run / "scratch" / "load_report.json").exists()


@pytest.mark.slow
def test_quick_demo_report_agrees_with_report_json(quick_demo):
    """Every per-seed and per-organ number of report.md is the one in report.json (3 decimals)."""
    report = (quick_demo / "report.md").read_text()
    results = json.loads((quick_demo / "report.json").read_text())
    sections = re.split(r"^### (\d+) labelled training phantoms?$", report, flags=re.M)
    tables = dict(zip(sections[1::2], sections[2::2]))
    assert set(tables) == set(results["regimes"])
    for n, text in tables.items():
        regime = results["regimes"][n]
        for organ in regime["organ_dice"]["scratch"]:
            row = re.search(rf"^\| {organ} \|(.*)\|$", text, re.M).group(1)
            cells = [float(c) for c in row.split("|")]
            assert cells == [round(regime["organ_dice"][a][organ], 3) for a in ARMS], organ
        for seed in regime["seeds"]:
            row = re.search(rf"^\| {seed} \|(.*)\|$", text, re.M).group(1)
            from_runs = [next(r["mean_dice"] for r in results["runs"]
                              if (r["labelled"], r["seed"], r["arm"]) == (int(n), seed, a)) for a in ARMS]
            assert [float(c) for c in row.split("|")] == [round(d, 3) for d in from_runs]
        for name, c in regime["comparisons"].items():
            assert f"| {name} | {c['mean_difference']:+.3f} | {c['ci_low']:+.3f} to {c['ci_high']:+.3f} |" in text
    assert f"{results['primary']['mean_difference']:+.3f}" in report.split("## Protocol")[0]


@pytest.mark.slow
def test_quick_demo_writes_every_picture_it_links(quick_demo):
    report = (quick_demo / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"finetune_curves.png", "pretext_curves.png", "predictions.png"} <= {Path(p).name for p in links}
    for link in links:
        path = quick_demo / link
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link


def test_demo_refuses_to_overwrite_an_earlier_demo(tmp_path):
    from volumefusion import VolumeFusionError
    from volumefusion.demo import run_demo

    (tmp_path / "report.md").write_text("earlier")
    with pytest.raises(VolumeFusionError, match="earlier demo"):
        run_demo(tmp_path, quick=True)


def test_settings_fix_the_protocol_and_quick_overrides_it():
    full, quick = load_settings(), load_settings(quick=True)
    assert len(full.protocol.seeds) >= 5 and full.protocol.primary == 1 and 1 in full.protocol.labelled
    assert quick.finetune_run_config().run.max_steps < full.finetune_run_config().run.max_steps
    # every arm and the live pretraining share the built-in weights' architecture and intensities
    builtin = full.pretrain_run_config()
    for s in (full, quick):
        assert s.finetune_run_config().model == builtin.model
        assert s.finetune_run_config().data.hu_window == builtin.data.hu_window
    assert load_settings(seeds=[11, 12]).protocol.seeds == (11, 12)


@pytest.mark.parametrize("edit, field", [
    (("labelled: [1, 4]", "labelled: [1, 9]"), "protocol.labelled"),
    (("alternative: greater", "alternative: less"), "protocol.alternative"),
    (("pool: 24", "pool: many"), "phantoms.pool"),
    (("    lr: 6.0e-3", "    lr: fast"), "optim.lr"),
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

    from volumefusion.checkpoint import load_checkpoint
    from volumefusion.nets import build_model
    from volumefusion.nets.weights import load_pretrained, resolve_weights

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
    from volumefusion.nets.weights import resolve_weights

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
