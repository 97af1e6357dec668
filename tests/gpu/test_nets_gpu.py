"""PCT-Net on CUDA: bf16 + channels_last_3d, fused attention kernels, torch.compile."""

from __future__ import annotations

import pytest
import torch

from volumefusion.nets import PCTNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def small_pctnet(channels=(8, 16, 32, 64, 128), heads=(2, 4, 8)) -> PCTNet:
    torch.manual_seed(0)
    return PCTNet(feature_channels=channels, num_heads=heads, window_size=6, dropout=(0, 0, 0, 0, 0),
                  drop_path=0.0).cuda()


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def test_bf16_channels_last_matches_fp32():
    # eval mode: BatchNorm with running statistics keeps the comparison well conditioned (train-mode
    # statistics of a random network amplify bf16 rounding to several percent, in any CNN)
    model = small_pctnet().eval()
    x = torch.randn(2, 1, 32, 64, 64, device="cuda")
    outputs = model(x)
    sum(o.square().mean() for o in outputs).backward()
    ref_out, ref_grad = [o.detach() for o in outputs], _grads(model)
    model.zero_grad()
    model.to(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(x.to(memory_format=torch.channels_last_3d))
    sum(o.float().square().mean() for o in outputs).backward()
    for ours, ref in zip(outputs, ref_out):
        assert ours.dtype == torch.bfloat16
        assert (ours.float() - ref).abs().max() <= 0.03 * ref.abs().max()
    grad = _grads(model)
    assert torch.isfinite(grad).all()
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99


def test_bf16_channels_last_trains():
    model = small_pctnet().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 64, 64, device="cuda").to(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(x)
    sum(o.float().square().mean() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_runs_on_the_memory_efficient_kernel(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = small_pctnet()
    x = torch.randn(2, 1, 32, 64, 64, device="cuda")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16,
                                                                      enabled=dtype == torch.bfloat16):
        outputs = model(x)
        sum(o.float().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_compile_has_no_graph_breaks_and_matches_eager():
    model = small_pctnet(channels=(4, 8, 16, 32, 64), heads=(2, 2, 4))
    x = torch.randn(2, 1, 16, 32, 32, device="cuda")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    ref = [o.detach() for o in model(x)]  # train mode, no dropout: deterministic
    outputs = torch.compile(model)(x)
    for a, b in zip(outputs, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
