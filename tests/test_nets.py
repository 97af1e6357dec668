"""PCT-Net and UNet3D: conformance with the reference, shapes, gradients, attention details."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks.network import CHECKPOINTING, saved_tensor_bytes, set_checkpointing
from tests.conftest import CONFORMANCE
from volumefusion.config import ModelConfig
from volumefusion.nets import PCTNet, UNet3D, build_model
from volumefusion.nets.pctnet import (
    SHIFT_MASK_VALUE,
    SwinBlock,
    reference_windows,
    relative_position_index,
    shift_mask,
)
from volumefusion.weights import load_pretrained

needs_conformance = pytest.mark.skipif(not (CONFORMANCE / "pctnet_small_io.pt").is_file(),
                                       reason="conformance data not present")

TINY = dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=3)


def tiny_pctnet(**kwargs) -> PCTNet:
    torch.manual_seed(0)
    return PCTNet(**{**TINY, **kwargs})


def reference_model(config: dict) -> PCTNet:
    """Our PCT-Net built to reproduce a reference configuration (its own parameter names)."""
    windows, shifted = reference_windows(config["input_size"], config["resolution_mode"])
    return PCTNet(config["in_chns"], config["class_num"], config["feature_chns"], config["dropout"],
                  num_heads=config["num_heads"], window_size=windows, shifted_windows=shifted,
                  resolution_mode=config["resolution_mode"])


@pytest.fixture(scope="module")
def conformance():
    """(our model with the reference checkpoint loaded, eval mode; the reference's inputs/outputs)."""
    io = torch.load(CONFORMANCE / "pctnet_small_io.pt", weights_only=True)
    model = reference_model(io["config"])
    load_pretrained(model, CONFORMANCE / "pctnet_small_misfm.pt")
    return model.eval(), io


@needs_conformance
def test_reproduces_reference_outputs(conformance):
    model, io = conformance
    with torch.no_grad():
        outputs = model(io["input"])
    assert len(outputs) == len(io["outputs"]) == 4
    for ours, ref in zip(outputs, io["outputs"]):
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4


@needs_conformance
def test_reference_weights_need_the_reference_index(conformance):
    model, io = copy.deepcopy(conformance[0]), conformance[1]
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index"):
            buf.copy_(relative_position_index(round(buf.shape[0] ** (1 / 3)), "exact"))
    with torch.no_grad():
        outputs = model(io["input"])
    assert max((a - b).abs().max().item() for a, b in zip(outputs, io["outputs"])) > 1e-2


def test_paper_configuration_has_44_2m_parameters():
    n = sum(p.numel() for p in PCTNet().parameters())
    assert abs(n / 44.2e6 - 1) <= 0.01


@needs_conformance
def test_paper_checkpoint_layout_loads_completely():
    layout = json.loads((CONFORMANCE / "pctnet_full_misfm_shapes.json").read_text())
    integer = ("index", "num_batches_tracked")
    state = {k: torch.zeros(v, dtype=torch.long if k.endswith(integer) else torch.float)
             for k, v in layout["state_dict_shapes"].items()}
    model = PCTNet()
    report = load_pretrained(model, {"model_state_dict": state})
    assert not report.missing and not report.shape_skipped and not report.unexpected
    assert len(report.loaded) == len(model.state_dict())
    unused_modules = {".".join(k.split(".")[:2]) for k in report.unused}
    assert {"embeddings.0", "embeddings.2", "pred_heads.0", "pred_heads.2"} <= unused_modules
    assert all(k.startswith(("embeddings.", "pred_heads.")) or ".norm_layer." in k for k in report.unused)


def _expected_shapes(size, mode, classes=3):
    first = (1, 2, 2) if mode else (2, 2, 2)
    second = (1, 2, 2) if mode == 2 else (2, 2, 2)
    scales = [(1, 1, 1), first, tuple(a * b for a, b in zip(first, second))]
    scales.append(tuple(2 * s for s in scales[2]))
    return [(2, classes) + tuple(n // s for n, s in zip(size, sc)) for sc in scales]


@pytest.mark.parametrize("mode,size", [(0, (16, 16, 32)), (0, (32, 16, 16)), (1, (8, 32, 16)),
                                       (1, (16, 16, 32)), (2, (4, 32, 16)), (2, (8, 16, 32))])
def test_pctnet_output_shapes(mode, size):
    model = tiny_pctnet(resolution_mode=mode, num_classes=3, in_channels=2)
    assert all(n % d == 0 for n, d in zip(size, model.size_divisor))
    with torch.no_grad():
        outputs = model(torch.randn(2, 2, *size))
        assert [tuple(o.shape) for o in outputs] == _expected_shapes(size, mode)
        model.deep_supervision = False
        assert tuple(model(torch.randn(2, 2, *size)).shape) == (2, 3) + size


@pytest.mark.parametrize("mode,size", [(0, (16, 32, 16)), (1, (8, 32, 48)), (2, (4, 16, 32))])
def test_unet_output_shapes(mode, size):
    torch.manual_seed(0)
    model = UNet3D(2, 3, (4, 8, 8, 16, 16), (0, 0, 0, 0.1, 0.1), resolution_mode=mode)
    with torch.no_grad():
        outputs = model(torch.randn(2, 2, *size))
        assert [tuple(o.shape) for o in outputs] == _expected_shapes(size, mode)
        model.deep_supervision = False
        assert tuple(model(torch.randn(2, 2, *size)).shape) == (2, 3) + size


def test_only_the_chosen_stem_and_head_are_built():
    shapes = {m: tiny_pctnet(resolution_mode=m).state_dict()["stem.proj.weight"].shape for m in (0, 1, 2)}
    assert shapes[0][2:] == (3, 3, 3) and shapes[1][2:] == (1, 3, 3) and shapes[2][2:] == (1, 3, 3)
    assert not any(k.startswith(("embeddings", "pred_heads")) for k in tiny_pctnet().state_dict())


def test_input_not_divisible_is_an_error():
    with pytest.raises(ValueError, match="multiples"):
        tiny_pctnet()(torch.randn(1, 1, 12, 32, 32))


@pytest.mark.parametrize("name", ["pctnet", "unet"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    if name == "pctnet":
        model = tiny_pctnet(drop_path=0.0)
    else:
        model = UNet3D(1, 3, (4, 8, 8, 16, 16))
    outputs = model(torch.randn(2, 1, 8, 16, 32))
    sum((o * torch.randn_like(o)).mean() for o in outputs).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 1, 8, 16, 16)
    grads = []
    for checkpointing in (False, True):
        model = tiny_pctnet(activation_checkpointing=checkpointing, dropout=(0, 0, 0, 0, 0), drop_path=0.0)
        assert model.activation_checkpointing is checkpointing
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)


def test_channels_last_3d_gives_the_same_outputs():
    model = tiny_pctnet().eval()
    x = torch.randn(2, 1, 8, 16, 32)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last_3d)
        out = model(x.to(memory_format=torch.channels_last_3d))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_runs_forward_and_backward(monkeypatch):
    model = tiny_pctnet()
    x = torch.randn(2, 1, 8, 16, 32)
    # oneDNN's bf16 conv3d backward on CPU (torch 2.13) returns a few non-finite weight gradients in
    # about half of identical runs, whatever the thread count; the native kernels are deterministic.
    # What is tested here is the network under autocast, so the test runs without oneDNN.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x)
    assert outputs[0].dtype == torch.bfloat16
    sum(o.float().mean() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_relative_position_index_exact_is_collision_free_reference_is_not():
    w = 6
    assert relative_position_index(w, "exact").unique().numel() == (2 * w - 1) ** 3
    assert relative_position_index(w, "reference").unique().numel() == 291
    with pytest.raises(ValueError):
        relative_position_index(w, "other")


def test_shift_mask_separates_rolled_regions():
    # each axis of 8 = two windows of 4, shift 2: the last window along an axis mixes [4, 6) and [6, 8)
    mask = shift_mask((8, 8, 8), 4, 2)
    assert mask.shape == (8, 64, 64)
    z, y, x = (torch.arange(64) // 16, torch.arange(64) // 4 % 4, torch.arange(64) % 4)
    for window, (last_z, last_y, last_x) in enumerate(torch.cartesian_prod(*[torch.tensor([0, 1])] * 3)):
        separated = torch.zeros(64, 64, dtype=torch.bool)
        for last, c in ((last_z, z), (last_y, y), (last_x, x)):
            if last:
                separated |= (c[:, None] < 2) != (c[None, :] < 2)
        assert torch.equal(mask[window] == SHIFT_MASK_VALUE, separated)
        assert torch.equal(mask[window] == 0, ~separated)


def test_shift_mask_is_cached_per_shape():
    block = SwinBlock(8, 2, 3, shift=1)
    for size in (3, 6, 3):
        block(torch.randn(1, size, size, size, 8))
    assert len(block._mask_cache) == 2


def test_reference_windows_follow_the_reference_rule():
    assert reference_windows((64, 128, 128), 1) == ((6, 6, 6), (True, True, True))
    assert reference_windows((32, 64, 64), 1) == ((6, 6, 4), (True, True, False))
    assert reference_windows((48, 96, 96), 1) == ((6, 6, 6), (True, True, False))


def test_build_model_from_config():
    cfg = ModelConfig(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=(2,),
                      rel_pos_index="reference")
    model = build_model(cfg, 3)
    assert isinstance(model, PCTNet) and model.rel_pos_index == "reference"
    assert model.size_divisor == (8, 16, 16)
    unet = build_model(ModelConfig(name="unet", feature_channels=(4, 8, 8, 16, 16)), 3)
    assert isinstance(unet, UNet3D) and unet.size_divisor == (8, 16, 16)
    for m in (model, unet):
        keys = m.state_dict().keys()
        heads = [k for k in keys if k.startswith(m.head_prefixes)]
        assert len(heads) == 8 and all(m.state_dict()[k].shape[0] == 3 for k in heads)
        assert any(k.startswith(m.encoder_prefixes) for k in keys)


@pytest.mark.parametrize("windows, shifted", [((3, 2, 2), (True, False, True)), ((2,), (False,))])
def test_build_model_sets_windows_and_shifts_per_level(windows, shifted):
    cfg = ModelConfig(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=windows,
                      shifted_windows=shifted)
    model = build_model(cfg, 3)
    windows, shifted = windows * (3 // len(windows)), shifted * (3 // len(shifted))
    levels = {"e2": 0, "d2": 0, "e3": 1, "d3": 1, "e4": 2}
    for name, level in levels.items():
        blocks = getattr(model.pyramid, name).swin.blocks
        assert [b.window for b in blocks] == [windows[level]] * 2
        assert [b.attn.window for b in blocks] == [windows[level]] * 2
        assert [b.shift for b in blocks] == [0, windows[level] // 2 if shifted[level] else 0]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 8, 16, 16))[0].shape == (1, 3, 8, 16, 16)


def test_full_checkpointing_changes_no_output_gradient_or_running_statistic():
    # dropout at every level (the checkpointed stem and head too): the recompute must replay the RNG
    base = tiny_pctnet(dropout=(0.1, 0.1, 0.2, 0.2, 0.2))
    x = torch.randn(2, 1, 8, 16, 16)
    runs = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        model.activation_checkpointing = checkpointing
        assert model.stem.checkpointing is model.head.checkpointing is checkpointing
        torch.manual_seed(1)
        outputs = model(x)
        sum(o.square().mean() for o in outputs).backward()
        runs.append((outputs, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (out0, grads0, state0), (out1, grads1, state1) = runs
    for a, b in zip(out1, out0):
        torch.testing.assert_close(a, b)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-6)
    # BatchNorm running statistics and batch counts move once per step, not again in the recompute
    for name, value in state0.items():
        torch.testing.assert_close(state1[name], value, rtol=0, atol=0)
    assert state1["head.up1.fuse.norm.num_batches_tracked"].item() == 1


def _saved_bytes(model: PCTNet, x: torch.Tensor) -> int:
    return saved_tensor_bytes(lambda: model(x), [*model.parameters(), *model.buffers()])


def test_saved_tensor_bytes_counts_each_storage_once_and_no_parameters():
    x = torch.randn(1000, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000))
    assert saved_tensor_bytes(lambda: (x[:500] * x[500:]).sum()) == 4000  # two views of one storage
    assert saved_tensor_bytes(lambda: (x * w).sum(), [w]) == 4000
    assert saved_tensor_bytes(lambda: (x.sin() * w).sum(), [w]) == 8000  # x, and sin's output


def test_checkpointing_keeps_fewer_activations_the_more_it_recomputes():
    model = tiny_pctnet()
    x = torch.randn(2, 1, 8, 16, 32)
    saved = {}
    for checkpointing in CHECKPOINTING:
        set_checkpointing(model, checkpointing)
        saved[checkpointing] = _saved_bytes(model, x)
    assert saved["none"] > saved["transformer"] > saved["full"]
    assert saved["full"] < saved["none"] / 2  # the stem's and head's convolutions hold most of it


def test_checkpointing_only_applies_in_training():
    model = tiny_pctnet().eval()
    x = torch.randn(2, 1, 8, 16, 16)
    plain = _saved_bytes(model, x)
    model.activation_checkpointing = True
    assert _saved_bytes(model, x) == plain > 0
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: model(x)) == 0
