"""The one checkpoint reader: what it says a checkpoint is, and that every loader reads a file once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import volumefusion as vf
from tests.conftest import CONFORMANCE, TINY_MODEL, write_ct_plans
from volumefusion import config
from volumefusion.checkpoint import read_checkpoint, save_checkpoint
from volumefusion.cli import main
from volumefusion.infer import Predictor
from volumefusion.nets import build_model
from volumefusion.weights import load_pretrained

needs_conformance = pytest.mark.skipif(not (CONFORMANCE / "pctnet_small_misfm.pt").is_file(),
                                       reason="conformance data not present")
TASK = {"kind": "segmentation", "num_classes": 3, "label_names": {"0": "background"}, "preprocessing": {}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny segmentation checkpoint, as ``.pt`` and as a safetensors export: (config, model, pt, safetensors)."""
    cfg = config.load(overrides=TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    folder = tmp_path_factory.mktemp("tiny")
    save_checkpoint(folder / "m.pt", {"model": {"module." + k: v for k, v in model.state_dict().items()},
                                      "config": cfg.to_dict(), "task": TASK, "step": 7})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "m.safetensors"),
              metadata={"config": json.dumps(cfg.to_dict()), "task": json.dumps(TASK), "num_classes": "3"})
    return cfg, model, folder / "m.pt", folder / "m.safetensors"


def test_a_checkpoint_says_what_it_holds(tiny):
    cfg, model, pt, st = tiny
    for path in (pt, st):
        ckpt = read_checkpoint(path)
        assert ckpt.layout == "volumefusion" and ckpt.source == str(path) and ckpt.path == path
        assert ckpt.num_classes == 3 and ckpt.preprocessing == {} and ckpt.config == cfg.to_dict()
        assert ckpt.state.keys() == model.state_dict().keys()  # wrapper prefixes gone
    assert read_checkpoint(pt).payload["step"] == 7 and read_checkpoint(st).file_format == "safetensors"
    plain = read_checkpoint({"state_dict": model.state_dict()})
    assert plain.layout == "state_dict" and plain.config == {} and plain.num_classes is None
    assert read_checkpoint(plain) is plain
    builtin = read_checkpoint("builtin:demo")
    assert builtin.source == "builtin:demo" and builtin.path.name == "demo.pt" and builtin.task["kind"] == "pretrain"


@needs_conformance
def test_a_misfm_checkpoint_brings_the_architecture_its_weights_show():
    ckpt = read_checkpoint(CONFORMANCE / "pctnet_small_misfm.pt")
    assert ckpt.layout == "misfm" and list(ckpt.payload) == ["iteration"]
    assert ckpt.config["model"]["window_size"] == [6, 6, 4] and ckpt.task["kind"] == "pretrain"
    assert ckpt.num_classes == 5


@pytest.mark.parametrize("which", ["pt", "safetensors"])
def test_every_loader_reads_a_checkpoint_file_once(tiny, tmp_path, count_reads, which):
    _, _, pt, st = tiny
    path = pt if which == "pt" else st
    reads = count_reads(path)
    loaders = {
        "load_model": lambda: vf.load_model(path),
        "load_predictor": lambda: Predictor.from_checkpoint(path, "cpu"),
        "load_pretrained": lambda: load_pretrained(build_model(config.load(overrides=TINY_MODEL).model, 2), path),
        "export nnunet": lambda: main(["-q", "export", "nnunet", "--checkpoint", str(path), "--plans",
                                       str(write_ct_plans(tmp_path / "p.json")), "--out", str(tmp_path / "nnunet")]),
        "finetune's checks": lambda: main(["-q", "finetune", "--data", str(tmp_path / "nowhere"), "--pretrained",
                                           str(path), "--out", str(tmp_path / "run")]),
    }
    for name, load in loaders.items():
        before = dict(reads)
        load()
        opened, loaded = reads["opened"] - before["opened"], reads["loaded"] - before["loaded"]
        assert opened == 1 and loaded == (which == "pt"), (name, opened, loaded)


@needs_conformance
def test_convert_reads_a_misfm_checkpoint_once(tmp_path, count_reads):
    reads = count_reads(CONFORMANCE / "pctnet_small_misfm.pt")
    assert main(["-q", "convert", str(CONFORMANCE / "pctnet_small_misfm.pt"), "--out", str(tmp_path / "o.pt")]) == 0
    assert reads == {"opened": 1, "loaded": 1}
    reads = count_reads(tmp_path / "o.pt")
    vf.load_model(tmp_path / "o.pt")
    assert reads == {"opened": 1, "loaded": 1}


def test_the_checkpoint_format_is_decided_in_one_function():
    """Only read_checkpoint tells our checkpoints, MIS-FM ones, safetensors files and built-in names apart."""
    import ast
    from pathlib import Path

    package = Path(vf.__file__).parent
    deciding = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("model_state_dict", ".safetensors", "builtin:"):
                function = next((f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                                 and f.lineno <= node.lineno <= f.end_lineno), None)
                deciding.append(f"{path.relative_to(package)}:{function}")
    assert set(deciding) == {"checkpoint.py:read_checkpoint", "checkpoint.py:resolve_weights"}, sorted(set(deciding))


@pytest.mark.parametrize(("name", "home"), [("resolve_weights", "volumefusion.checkpoint"),
                                            ("export_weights", "volumefusion.checkpoint"),
                                            ("model_config_from_misfm", "volumefusion.nets.misfm")])
def test_names_that_left_nets_weights_still_import_from_it_for_one_release_with_a_warning(name, home):
    import importlib

    import volumefusion.nets.weights

    with pytest.warns(DeprecationWarning, match=f"volumefusion.nets.weights.{name} moved to {home}.{name}"):
        alias = getattr(volumefusion.nets.weights, name)
    assert alias is getattr(importlib.import_module(home), name)
