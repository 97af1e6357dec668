"""The embedded demo (`volumefusion demo`) and the docs that are generated from the code."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from volumefusion import VolumeFusionError
from volumefusion.config import PRESETS
from volumefusion.demo import ARMS, RunResult, _dice_tables, load_settings, sign_test_p

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `volumefusion demo --quick` run through the CLI (all stages, a few steps each)."""
    from volumefusion.cli import main

    out = tmp_path_factory.mktemp("demo") / "vf-demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_quick_demo_report_has_dice_table_for_both_arms(quick_demo):
    report = (quick_demo / "report.md").read_text()
    labels = json.loads((quick_demo / "data" / "Task01_Phantom" / "dataset.json").read_text())["labels"]
    header = next(line for line in report.splitlines() if line.startswith("| organ |"))
    assert "scratch" in header and "pretrained" in header
    for name in list(labels.values())[1:]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(re.fullmatch(r"[+-]?\d\.\d{3}", c) for c in cells[1:]), row
    assert "| **mean** |" in report


@pytest.mark.slow
def test_quick_demo_writes_every_picture_it_links(quick_demo):
    report = (quick_demo / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    names = {Path(link).name for link in links}
    assert {"fusion.png", "finetune_curves.png", "predictions.png", "pretrain_progress.png"} <= names
    for link in links:
        path = quick_demo / link
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link


@pytest.mark.slow
def test_quick_demo_evaluates_every_held_out_case_for_both_arms(quick_demo):
    cases = {p.name.removesuffix(".nii.gz") for p in (quick_demo / "data" / "test" / "labels").iterdir()}
    settings = load_settings(quick=True)
    assert len(cases) == settings["phantoms"]["test"]
    for arm in ARMS:
        for seed in settings["seeds"]:
            with open(quick_demo / "runs" / f"seed{seed}" / arm / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            assert {r["case"] for r in rows} == cases
            assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_quick_demo_arms_differ_only_in_starting_weights(quick_demo):
    run = quick_demo / "runs" / "seed0"
    scratch, pretrained = (run / arm / "config.yaml" for arm in ARMS)
    assert scratch.read_text() == pretrained.read_text()
    assert (run / "pretrained" / "load_report.json").is_file()
    assert not (run / "scratch" / "load_report.json").exists()
    results = json.loads((quick_demo / "results.json").read_text())
    assert {r["arm"] for r in results["runs"]} == set(ARMS)


def test_demo_refuses_to_overwrite_an_earlier_demo(tmp_path):
    from volumefusion.demo import run_demo

    (tmp_path / "report.md").write_text("earlier")
    with pytest.raises(VolumeFusionError, match="earlier demo"):
        run_demo(tmp_path, quick=True)


def test_quick_settings_override_the_full_ones():
    full, quick = load_settings(), load_settings(quick=True)
    assert quick["phantoms"]["test"] < full["phantoms"]["test"]
    assert quick["pretrain"]["run"]["max_steps"] < full["pretrain"]["run"]["max_steps"]
    assert quick["common"] == full["common"]
    assert len(full["seeds"]) >= 3


def test_bad_demo_settings_name_the_problem(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text((PRESETS / "demo.yaml").read_text() + "\nextra: 1\n")
    with pytest.raises(VolumeFusionError, match="unknown section 'extra'"):
        load_settings(path)
    path.write_text((PRESETS / "demo.yaml").read_text().replace("train: 4", "train: 0"))
    with pytest.raises(VolumeFusionError, match="phantoms.train"):
        load_settings(path)


def test_paired_organs_become_one_class():
    from volumefusion.data.phantoms import LABEL_NAMES
    from volumefusion.demo import paired_organs_merged

    names, table = paired_organs_merged(LABEL_NAMES)
    assert names[0] == "background" and table[0] == 0
    assert "lung" in names.values() and "kidney" in names.values() and "liver" in names.values()
    lung = [v for v, n in names.items() if n == "lung"][0]
    by_name = {n: v for v, n in LABEL_NAMES.items()}
    assert table[by_name["lung_right"]] == table[by_name["lung_left"]] == lung
    assert sorted(set(table.tolist())) == list(range(len(names)))
    assert len(names) == len(LABEL_NAMES) - 2


def _run(seed, arm, dice):
    return RunResult(seed, arm, Path("."), 0.0, None, {o: {"c1": d[0], "c2": d[1]} for o, d in dice.items()})


def test_dice_tables_average_cases_then_organs_then_seeds_and_count_wins():
    runs = [
        _run(0, "scratch", {"liver": (0.2, 0.4), "spleen": (0.0, 0.2)}),      # mean 0.2
        _run(0, "pretrained", {"liver": (0.6, 0.6), "spleen": (0.2, 0.2)}),   # mean 0.4
        _run(1, "scratch", {"liver": (0.5, 0.5), "spleen": (0.5, 0.5)}),      # mean 0.5
        _run(1, "pretrained", {"liver": (0.4, 0.4), "spleen": (0.4, 0.4)}),   # mean 0.4
    ]
    organ_table, seed_table, numbers = _dice_tables(runs, [0, 1])
    assert numbers["mean_dice"]["scratch"] == pytest.approx(0.35)
    assert numbers["mean_dice"]["pretrained"] == pytest.approx(0.4)
    assert numbers["organ_dice"]["pretrained"]["liver"] == pytest.approx(0.5)
    assert numbers["wins"] == 1
    assert numbers["sign_test_p"] == pytest.approx(0.75)  # >= 1 win of 2 by chance: 3 of 4 outcomes
    assert "| liver | 0.400 | 0.500 | +0.100 |" in organ_table
    assert "| 1 | 0.500 | 0.400 | -0.100 | no |" in seed_table
    assert "1 of 2" in seed_table


def test_sign_test_counts_the_chance_of_as_many_wins_by_luck():
    assert sign_test_p(3, 3) == 1 / 8
    assert sign_test_p(0, 5) == 1.0
    assert sign_test_p(5, 8) == pytest.approx((56 + 28 + 8 + 1) / 256)


def test_user_guide_lists_every_config_field_as_the_code_describes_it():
    from volumefusion.config import describe_fields

    guide = (ROOT / "docs" / "user-guide.md").read_text()
    pattern = r"<!-- config-fields:.*?-->\n```text\n(.*?)\n```\n<!-- end config-fields -->"
    section = re.search(pattern, guide, re.S)
    assert section, "docs/user-guide.md lost its generated config-fields section"
    assert section.group(1) == describe_fields(), (
        "config fields changed: regenerate docs/user-guide.md's section from `volumefusion config --fields`")


def test_docs_link_only_to_files_that_exist():
    for doc in ("user-guide.md", "method.md", "demo-report.md"):
        path = ROOT / "docs" / doc
        if not path.exists():
            continue
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{doc} links to missing {target}"
