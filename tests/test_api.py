"""The Python API's checkpoint loader reads every supported format to the same network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import volumefusion as vf
from tests.conftest import CONFORMANCE, TINY_MODEL
from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import save_checkpoint
from volumefusion.nets import build_model


@pytest.fixture(scope="module")
def tiny():
    cfg = config.load(overrides=TINY_MODEL)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, 3).eval()


def test_load_model_reads_a_checkpoint_and_a_safetensors_export_alike(tiny, tmp_path):
    cfg, model = tiny
    state = model.state_dict()
    save_checkpoint(tmp_path / "m.pt", {"model": state, "config": cfg.to_dict(),
                                        "task": {"kind": "segmentation", "num_classes": 3}})
    # the metadata `volumefusion convert --safetensors` writes
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"),
              metadata={"config": json.dumps(cfg.to_dict()), "num_classes": "3"})
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        expected = model(x)[0]
        for name in ("m.pt", "m.safetensors"):
            loaded = vf.load_model(tmp_path / name)
            assert loaded.num_classes == 3 and loaded.config.model == cfg.model
            assert torch.equal(loaded.model(x)[0], expected)


def test_load_model_names_a_safetensors_file_without_our_metadata(tiny, tmp_path):
    _, model = tiny
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(VolumeFusionError, match="w.safetensors: no volumefusion config"):
        vf.load_model(tmp_path / "w.safetensors")


@pytest.mark.skipif(not (CONFORMANCE / "pctnet_small_misfm.pt").is_file(), reason="needs ../shared/conformance")
def test_load_model_reads_an_official_misfm_checkpoint():
    loaded = vf.load_model(CONFORMANCE / "pctnet_small_misfm.pt")
    io = torch.load(CONFORMANCE / "pctnet_small_io.pt", weights_only=True)
    with torch.no_grad():
        outputs = loaded.model(io["input"])
    for a, b in zip(outputs, io["outputs"], strict=True):
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("call", "phrase"), [
    (lambda: vf.dice_per_class(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "liver"), "labels: 'liver'; expected"),
    (lambda: vf.dice_per_class(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [1.5]), "whole-number label values"),
    (lambda: vf.load_config({"optim": {"lr": 1e-3}}), "config_files: a dict; expected a path"),
    (lambda: vf.load_config(["finetune", 3]), "config_files: holds a int (3)"),
    (lambda: vf.load_predictor("builtin:demo", tta="yes"), "tta: 'yes'; expected True, False or the axes"),
    (lambda: vf.prepare_collection(["ct/"], "store", settings={"spacing_zyx": (1, 1, 1)}),
     "settings: a dict; expected PrepareSettings"),
    (lambda: vf.prepare_collection(None, "store"), "inputs: none given"),
    (lambda: vf.pretrain(None, "runs/x"), "data: None; expected one path"),
    (lambda: vf.finetune("data", ["runs/a", "runs/b"]), "out: ['runs/a', 'runs/b']; expected one path"),
    (lambda: vf.load_model(None), "path: None; expected one path"),
])
def test_api_arguments_of_the_wrong_type_are_named(call, phrase, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VolumeFusionError) as error:
        call()
    assert phrase in str(error.value), str(error.value)
    assert not any(tmp_path.iterdir())  # refused before anything is written
