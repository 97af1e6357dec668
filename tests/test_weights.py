"""Loading pretrained weights: our checkpoints, MIS-FM checkpoints, adaptations, errors, convert."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import CONFORMANCE, write_bad_checkpoints
from volumefusion import VolumeFusionError, config
from volumefusion.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from volumefusion.cli import main
from volumefusion.nets import PCTNet, UNet3D, build_model
from volumefusion.nets.misfm import misfm_num_classes, misfm_shifted_windows, model_config_from_misfm
from volumefusion.nets.pctnet import reference_windows, relative_position_index
from volumefusion.weights import adapt_input_conv, load_pretrained

needs_conformance = pytest.mark.skipif(not (CONFORMANCE / "pctnet_full_misfm_shapes.json").is_file(),
                                       reason="conformance data not present")
TINY = dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=2)


def tiny(seed: int = 0, **kwargs) -> PCTNet:
    torch.manual_seed(seed)
    return PCTNet(**{**TINY, **kwargs}).eval()


def misfm_paper_layout(trained_mode: int) -> dict[str, torch.Tensor]:
    """Zero tensors in the layout of the official paper checkpoint, with the reference index and the
    stem of ``trained_mode`` marked as trained."""
    layout = json.loads((CONFORMANCE / "pctnet_full_misfm_shapes.json").read_text())["state_dict_shapes"]
    state = {k: torch.zeros(shape) for k, shape in layout.items()}
    for key, shape in layout.items():
        if key.endswith("relative_position_index"):
            state[key] = relative_position_index(round(shape[0] ** (1 / 3)), "reference")
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100 if key.startswith(f"embeddings.{trained_mode}.") else 0)
    return state


def misfm_small_uniform() -> dict:
    """The small conformance checkpoint with its 1/16 level widened to window 6 (random bias tables)."""
    ckpt = torch.load(CONFORMANCE / "pctnet_small_misfm.pt", weights_only=True)
    state = ckpt["model_state_dict"]
    gen = torch.Generator().manual_seed(0)
    for key in [k for k in state if "convtrans_e4.trans" in k]:
        if key.endswith("relative_position_bias_table"):
            state[key] = torch.randn(11**3, state[key].shape[1], generator=gen)
        elif key.endswith("relative_position_index"):
            state[key] = relative_position_index(6, "reference")
    state["embeddings.1.conv0.conv_conv.0.num_batches_tracked"] = torch.tensor(10)
    return ckpt


def test_class_count_change_keeps_everything_but_the_output_convolutions():
    source = tiny(seed=1, num_classes=5)
    model = tiny(seed=2, num_classes=3)
    report = load_pretrained(model, source.state_dict())
    skipped = {k for k, _, _ in report.shape_skipped}
    assert skipped == {k for k in model.state_dict() if k.startswith(model.head_prefixes)}
    assert not report.missing and not report.unexpected
    for key, value in model.state_dict().items():
        same = torch.equal(value, source.state_dict()[key])
        assert same != (key in skipped)
    assert "class count 5 -> 3" in report.format()


def test_channel_count_change_adapts_the_first_convolution():
    source = tiny(seed=1)
    model = tiny(seed=2, in_channels=2)
    report = load_pretrained(model, source.state_dict())
    assert [a[0] for a in report.adapted] == ["stem.proj.weight"]
    assert not report.shape_skipped and not report.missing
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():  # two copies of one channel respond like the single channel did
        torch.testing.assert_close(model(x.repeat(1, 2, 1, 1, 1))[0], source(x)[0])


@pytest.mark.parametrize(("before", "after"), [(1, 3), (2, 1), (3, 2), (2, 4)])
def test_adapted_first_convolution_responds_to_identical_channels_as_before(before, after):
    weight = torch.randn(6, before, 1, 3, 3)
    x = torch.randn(1, 1, 4, 8, 8)
    expected = torch.nn.functional.conv3d(x.repeat(1, before, 1, 1, 1), weight, padding=(0, 1, 1))
    adapted = adapt_input_conv(weight, after)
    assert adapted.shape == (6, after, 1, 3, 3)
    torch.testing.assert_close(torch.nn.functional.conv3d(x.repeat(1, after, 1, 1, 1), adapted, padding=(0, 1, 1)),
                               expected)


def test_only_leading_wrapper_prefixes_are_stripped():
    state = {"module._orig_mod.a.weight": torch.zeros(1), "encoder.submodule.weight": torch.ones(1)}
    assert list(clean_state_dict(state)) == ["a.weight", "encoder.submodule.weight"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_state_dict_loads(prefix):
    source = tiny(seed=1)
    model = tiny(seed=2)
    report = load_pretrained(model, {prefix + k: v for k, v in source.state_dict().items()})
    assert len(report.loaded) == len(model.state_dict()) and not report.unexpected
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_our_checkpoint_file_loads_and_report_serialises(tmp_path):
    source = tiny(seed=1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": source.state_dict(), "config": {}, "step": 3})
    model = tiny(seed=2)
    report = load_pretrained(model, path)
    assert report.layout == "volumefusion" and report.source == str(path)
    assert len(report.loaded) == len(model.state_dict())
    assert json.loads(json.dumps(report.to_dict()))["rel_pos_index"] == "exact"


def test_unet_weights_load_into_a_unet_with_other_classes():
    torch.manual_seed(0)
    source = UNet3D(1, 5, (4, 8, 8, 16, 16))
    model = UNet3D(1, 2, (4, 8, 8, 16, 16))
    report = load_pretrained(model, source.state_dict())
    heads = {k for k in model.state_dict() if k.startswith(model.head_prefixes)}
    assert {k for k, _, _ in report.shape_skipped} == heads


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    save_checkpoint(path, {"model": tiny().state_dict()})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(VolumeFusionError, match="broken.pt"):
        load_pretrained(tiny(), path)


def test_foreign_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"epoch": 3, "notes": "hello"}, path)
    with pytest.raises(VolumeFusionError, match="foreign.pt.*no model weights"):
        load_pretrained(tiny(), path)
    with pytest.raises(VolumeFusionError, match="none of its"):
        load_pretrained(tiny(), torch.nn.Linear(3, 4).state_dict())


def test_an_encoder_tensor_that_does_not_load_is_an_error_naming_it():
    source = tiny(seed=1)
    model = PCTNet(feature_channels=(4, 8, 16, 32, 128), num_heads=(2, 2, 4), window_size=2)
    with pytest.raises(VolumeFusionError) as error:
        load_pretrained(model, source.state_dict(), name="pre.pt")
    message = str(error.value)
    assert message.startswith("pre.pt: 43 pretrained tensor(s)")
    assert "pyramid.down4.conv.weight: [64, 32, 3, 3, 3] in the checkpoint vs [128, 32, 3, 3, 3] in the model" \
        in message
    assert message.endswith("--partial-load pyramid.down4 pyramid.e4 pyramid.up4 (finetune.partial_load)")


def test_partial_loading_by_name_accepts_exactly_the_named_tensors():
    source = tiny(seed=1)
    source_state = source.state_dict()
    source_state["stem.proj.weight"] = torch.zeros(4, 1, 1, 1, 1)  # the wrong kernel size
    model = tiny(seed=2)
    fresh = model.state_dict()["stem.proj.weight"].clone()
    with pytest.raises(VolumeFusionError, match=r"stem\.proj\.weight: \[4, 1, 1, 1, 1\] in the checkpoint"):
        load_pretrained(model, source_state)
    report = load_pretrained(model, source_state, partial=["stem.proj"])
    assert [k for k, _, _ in report.shape_skipped] == ["stem.proj.weight"]
    assert "stem.proj.weight [4, 1, 1, 1, 1] vs model [4, 1, 1, 3, 3]" in report.format()
    assert torch.equal(model.state_dict()["stem.proj.weight"], fresh)
    with pytest.raises(VolumeFusionError, match="stem.projection names no tensor"):
        load_pretrained(tiny(), source_state, partial=["stem.projection"])


def test_checkpoint_errors_say_what_the_file_is_and_never_suggest_an_unsafe_load(tmp_path):
    import warnings

    for path, phrase in write_bad_checkpoints(tmp_path).values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's pickle-protocol warning stays silent
            with pytest.raises(VolumeFusionError) as error:
                load_checkpoint(path, expected="a test checkpoint")
        message = str(error.value)
        assert message.startswith(f"{path}: ") and phrase in message, message
        assert message.endswith("expected a test checkpoint") and "weights_only" not in message
        if phrase == "never unpickles":  # refused for what it holds, not called damaged
            assert "damaged" not in message, message


def test_predict_and_convert_say_what_they_expect_of_a_wrong_file(tmp_path, capsys):
    image = tmp_path / "files" / "ct.nii.gz"
    write_bad_checkpoints(tmp_path / "files")
    assert main(["predict", "-m", str(image), "-i", str(image), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"volumefusion predict: error: {image}: a gzip-compressed image file (NIfTI); expected a "
                   "checkpoint written by `volumefusion finetune`")
    assert main(["convert", str(image), "--out", str(tmp_path / "x.pt")]) == 2
    assert "expected a MIS-FM / PyMIC PCT-Net checkpoint" in capsys.readouterr().err


@needs_conformance
def test_misfm_weights_bring_their_reference_index():
    io = torch.load(CONFORMANCE / "pctnet_small_io.pt", weights_only=True)
    c = io["config"]
    model = PCTNet(c["in_chns"], c["class_num"], c["feature_chns"], num_heads=c["num_heads"],
                   window_size=(6, 6, 4), shifted_windows=(True, True, False), rel_pos_index="exact")
    report = load_pretrained(model, CONFORMANCE / "pctnet_small_misfm.pt")
    assert model.rel_pos_index == report.rel_pos_index == "reference"
    assert report.layout == "misfm" and not report.missing and not report.unexpected


@needs_conformance
def test_model_config_from_misfm_reads_the_architecture():
    state = misfm_paper_layout(trained_mode=2)
    cfg = model_config_from_misfm(state)
    assert cfg == {"name": "pctnet", "in_channels": 1, "feature_channels": [24, 48, 128, 256, 512],
                   "depths": [2, 2, 2], "num_heads": [4, 8, 16], "window_size": [6], "shifted_windows": [True],
                   "resolution_mode": 2, "rel_pos_index": "reference", "deep_supervision": True}
    assert misfm_num_classes(state) == 5


@needs_conformance
def test_convert_writes_a_checkpoint_that_reproduces_the_misfm_model(tmp_path):
    ckpt = misfm_small_uniform()
    src = tmp_path / "misfm.pt"
    torch.save(ckpt, src)
    out, st = tmp_path / "ours.pt", tmp_path / "ours.safetensors"
    assert main(["convert", str(src), "--out", str(out), "--safetensors", str(st)]) == 0

    ours = load_checkpoint(out)
    assert ours["task"]["kind"] == "pretrain" and ours["task"]["num_classes"] == 5
    model_cfg = ours["config"]["model"]
    assert model_cfg["rel_pos_index"] == "reference" and model_cfg["feature_channels"] == [8, 16, 32, 64, 128]
    from safetensors.torch import load_file

    assert load_file(st).keys() == ours["model"].keys()

    def build():
        torch.manual_seed(5)
        return PCTNet(feature_channels=(8, 16, 32, 64, 128), num_heads=(2, 4, 8)).eval()

    direct, converted = build(), build()
    load_pretrained(direct, ckpt)
    report = load_pretrained(converted, out)
    assert len(report.loaded) == len(converted.state_dict())
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(converted(x), direct(x)))


@pytest.mark.parametrize("input_size", [(64, 128, 128), (32, 64, 64), (16, 32, 32)])
def test_shifts_follow_from_the_windows_of_a_misfm_model(input_size):
    windows, shifted = reference_windows(input_size)
    assert misfm_shifted_windows(list(windows)) == list(shifted)


@needs_conformance
def test_convert_reproduces_a_misfm_model_with_windows_per_level(tmp_path):
    out = tmp_path / "ours.pt"
    assert main(["convert", str(CONFORMANCE / "pctnet_small_misfm.pt"), "--out", str(out)]) == 0
    ours = load_checkpoint(out)
    cfg = config.load(base={"model": ours["config"]["model"]})
    assert cfg.model.window_size == (6, 6, 4) and cfg.model.shifted_windows == (True, True, False)
    model = build_model(cfg.model, ours["task"]["num_classes"]).eval()
    report = load_pretrained(model, out)
    assert len(report.loaded) == len(model.state_dict())
    io = torch.load(CONFORMANCE / "pctnet_small_io.pt", weights_only=True)
    with torch.no_grad():
        outputs = model(io["input"])
    for a, b in zip(outputs, io["outputs"], strict=True):
        assert (a - b).abs().max().item() <= 1e-4


@needs_conformance
def test_convert_set_corrects_what_the_weights_cannot_show(tmp_path):
    out = tmp_path / "ours.pt"
    args = ["convert", str(CONFORMANCE / "pctnet_small_misfm.pt"), "--out", str(out)]
    assert main([*args, "--set", "model.shifted_windows=[true,false,false]"]) == 0
    assert load_checkpoint(out)["config"]["model"]["shifted_windows"] == [True, False, False]
    assert main([*args, "--set", "optim.lr=1"]) == 2  # only model fields


def test_convert_rejects_a_non_misfm_checkpoint(tmp_path, capsys):
    path = tmp_path / "ours.pt"
    save_checkpoint(path, {"model": tiny().state_dict()})
    assert main(["convert", str(path), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
    unet = tmp_path / "pymic_unet.pt"  # a PyMIC checkpoint of another network
    torch.save({"model_state_dict": UNet3D(1, 2, (4, 8, 8, 16, 16)).state_dict()}, unet)
    assert main(["convert", str(unet), "--out", str(tmp_path / "x.pt")]) == 2
    assert f"error: {unet}: not a MIS-FM PCT-Net state dict" in capsys.readouterr().err


def test_convert_checks_its_outputs_before_reading_the_checkpoint(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["convert", str(tmp_path / "random.pt"), "--out", str(tmp_path / "file" / "ours.pt")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'file' / 'ours.pt'}: cannot be created for --out: {tmp_path / 'file'} is a file" in err
    assert main(["convert", str(tmp_path / "random.pt"), "--out", str(tmp_path / "ours.pt"),
                 "--safetensors", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: is a folder; --safetensors takes a file name" in capsys.readouterr().err
