"""The frozen-encoder probe: pretrained features against random ones, from the API, the CLI and inside
a pretraining run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MODEL
from volumefusion import VolumeFusionError, config
from volumefusion.cli import main
from volumefusion.data.phantoms import write_msd_dataset
from volumefusion.train.logging import read_metrics
from volumefusion.train.probe import probe
from volumefusion.train.runs import finetune, pretrain

RECIPE = [*TINY_MODEL, "optim.lr=1e-2", "optim.warmup_steps=5", "run.val_every=1000", "finetune.mirror_axes=[]",
          "finetune.foreground_ratio=0.5", "finetune.overlap=0"]


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    """An encoder trained with labels on phantoms the probe never sees (the positive control)."""
    root = tmp_path_factory.mktemp("supervised")
    data = write_msd_dataset(root / "Task02_Other", seeds=[21, 22, 23, 24], shape=(24, 48, 48))
    finetune([], [*RECIPE, "run.max_steps=80"], data, root / "run", None)
    return root / "run" / "checkpoints" / "latest.pt"


def test_a_supervised_encoder_beats_a_random_one_and_the_cli_writes_the_table(supervised, phantom_dataset,
                                                                                 tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", str(supervised), "--data", str(phantom_dataset), "--out", str(out), "--steps", "20",
            "--seeds", "0", "1", "--labelled", "1", "--device", "cpu", "--workers", "1"]
    for item in RECIPE:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "probe.json").read_text())
    entry = saved["comparisons"]["run/latest"]["probe-random"]
    assert entry["test"]["wins"] == 2 and entry["probe"] > entry["random"] + 0.05, entry
    assert "| run/latest | probe |" in printed and (out / "probe.md").read_text().count("| run/latest |") == 1
    # each run trained on one case drawn by its seed, and was scored on the held-out cases
    split = json.loads((out / "splits" / "seed1.json").read_text())
    assert len(split["train"]) == 1 and not set(split["train"]) & set(split["val"])


def test_probe_keeps_finished_runs_and_shares_the_random_arm(supervised, phantom_dataset, tmp_path):
    recipe = [*RECIPE, "run.max_steps=2"]
    first = probe({"a": supervised}, phantom_dataset, tmp_path, overrides=recipe, seeds=[0], device="cpu", workers=1)
    result_file = next((tmp_path / "runs").glob("*/random/seed0/result.json"))
    stamp = result_file.stat().st_mtime_ns
    second = probe({"a": supervised, "b": supervised}, phantom_dataset, tmp_path, overrides=recipe, seeds=[0],
                   device="cpu", workers=1)
    assert result_file.stat().st_mtime_ns == stamp  # not run again
    assert len(list((tmp_path / "runs").glob("*/random/seed0"))) == 1
    assert second.scores("a", "probe") == first.scores("a", "probe")
    assert second.scores("b", "random") == second.scores("a", "random")
    # a folder written before a setting existed is the same probe when the new setting keeps its default
    recorded = json.loads((tmp_path / "recipe.json").read_text())
    del recorded["defines"]["recipe"]["run"]["stop_after"]
    (tmp_path / "recipe.json").write_text(json.dumps(recorded))
    probe({"a": supervised}, phantom_dataset, tmp_path, overrides=recipe, seeds=[0], device="cpu", workers=1)
    assert result_file.stat().st_mtime_ns == stamp
    with pytest.raises(VolumeFusionError, match=r"holds a probe with another recipe \(run.max_steps: 2 -> 3\)"):
        probe({"a": supervised}, phantom_dataset, tmp_path, overrides=[*RECIPE, "run.max_steps=3"], seeds=[0],
              device="cpu", workers=1)


def test_probe_refuses_two_checkpoints_of_one_name(supervised, phantom_dataset, tmp_path):
    with pytest.raises(VolumeFusionError, match="both named"):
        probe([supervised, supervised], phantom_dataset, tmp_path, device="cpu")


def test_a_pretraining_probes_its_checkpoints(phantom_store, phantom_dataset, tmp_path, monkeypatch):
    import volumefusion.train.logging as run_logging

    drawn = {}
    save_curves = run_logging.save_curves
    monkeypatch.setattr(run_logging, "save_curves",
                        lambda path, panels: (drawn.update(panels), save_curves(path, panels)))
    cfg = config.load(overrides=[*TINY_MODEL, "run.max_steps=4", "run.val_every=100", "run.checkpoint_every=100",
                                 "probe.every=2", f"probe.data={phantom_dataset}", "probe.steps=2",
                                 "probe.labelled=1"])
    from volumefusion.train.probe import probe_hook

    pretrain(cfg, phantom_store, tmp_path, on_checkpoint=probe_hook(cfg, tmp_path))
    probes = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "probe_score" in r]
    assert [r["step"] for r in probes] == [2, 4]
    assert all(0 <= r["probe_score"] <= 1 and 0 <= r["probe_random"] <= 1 for r in probes)
    assert probes[0]["probe_random"] == probes[1]["probe_random"]  # the random arm ran once
    assert (tmp_path / "progress.png").stat().st_size > 0
    panel = drawn["probe: held-out Dice, encoder frozen"]  # progress.png shows the probe beside the pretext
    assert [s for s, _ in panel["pretrained encoder"]] == [2, 4] and len(panel["random encoder"]) == 2
    assert (tmp_path / "probe" / "probe.json").is_file()


def test_probe_every_without_data_is_refused_before_any_work():
    with pytest.raises(config.ConfigError, match="probe.data"):
        config.load(overrides=["probe.every=100"])


def test_probe_help_says_what_it_compares_and_where_the_table_goes(capsys):
    with pytest.raises(SystemExit) as done:
        main(["probe", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for phrase in ("randomly initialised encoder", "--labelled", "--finetune", "OUT/probe.md", "Wilcoxon",
                   "default 1000"):
        assert phrase in " ".join(text.split()), phrase
