"""PCT-Net training step: throughput, peak memory per sample and achieved TFLOP/s; activation memory.

Paper configuration (44.2 M parameters) at [64, 128, 128], 5 classes, Dice + CE with deep
supervision, Adam; random inputs and labels on the device (no data loading). Modes: fp32; bf16
(autocast, channels_last_3d, cuDNN benchmark); bf16 + activation checkpointing (CUDA only). bf16 +
torch.compile is :mod:`benchmarks.compile`, timed apart because compiling takes minutes. The
baselines are the reference MIS-FM implementation as measured on an
H200 (issue 9), for calibration only: they come from another card whenever this one is not an H200.

On the CPU it also counts the activations a training step keeps for its backward pass, per sample,
in fp32 and bf16, without and with activation checkpointing (:func:`saved_activations`). The count
runs on fake tensors (shapes only, no arithmetic), so it takes seconds at full size and describes
any device; it is the part of peak memory that grows with the batch, not the peak itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from volumefusion.nets import PCTNet
from volumefusion.nets.pctnet import SwinLayer
from volumefusion.train.losses import DeepSupervisionLoss

# reference PCT-Net, H200: (samples/s, GB per sample) per mode, and FLOPs of forward + backward
REFERENCE_H200 = {
    "fp32": (14.1, 8.5, "reference PCT-Net, fp32, batch 4 (measured on H200)"),
    "bf16": (18.4, 5.0, "reference PCT-Net, bf16 autocast + cuDNN benchmark, batch 8 (measured on H200)"),
    # the reference has no activation checkpointing: its bf16 step is what this mode replaces
    "bf16+checkpointing": (18.4, 5.0, "reference PCT-Net, bf16 autocast + cuDNN benchmark, batch 8 "
                                      "(measured on H200)"),
    "bf16+compile": (38.6, 4.3, "reference PCT-Net, bf16 + channels_last_3d + torch.compile, batch 8 "
                                "(measured on H200)"),
}
REFERENCE_TFLOP_PER_SAMPLE = 2.13
NUM_CLASSES = 5
# what activation checkpointing recomputes: nothing, the transformer blocks only, or (the model's
# activation_checkpointing) also the full- and 1/2-resolution convolutions
CHECKPOINTING = ("none", "transformer", "full")


def _model(tiny: bool) -> PCTNet:
    torch.manual_seed(0)
    if tiny:
        return PCTNet(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=2)
    return PCTNet()


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that autograd keeps for the backward pass while ``fn()`` runs: each distinct storage of a
    saved tensor counted once (whole storage), the storages of ``exclude`` (parameters, buffers) not.

    Works on real and fake tensors. ``fn``'s result is dropped, so the graph is freed afterwards.
    """
    excluded = {t.untyped_storage()._cdata for t in exclude}
    storages = {}  # held until the end, so no storage is freed and its address reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in excluded:
            storages[storage._cdata] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in storages.values())


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention (with the arguments PCT-Net uses) that keeps for backward what the
    GPU's fused kernels (memory-efficient / cuDNN) keep: q, k, v, the additive mask, the output and a
    float32 log-sum-exp per query. For counting only: it has no backward pass. The CPU's math kernel, which it replaces,
    would also keep the (windows, heads, T, T) attention probabilities when dropout is on."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask=None, dropout_p=0.0):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("_FusedAttention only counts saved tensors; it has no backward pass")


class _AttentionAsOnGPU(TorchFunctionMode):
    """Routes :func:`~torch.nn.functional.scaled_dot_product_attention` through :class:`_FusedAttention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args, kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0))
        return func(*args, **kwargs)


def set_checkpointing(model: PCTNet, checkpointing: str) -> None:
    """Recompute nothing (``none``), the transformer blocks only, or everything the model's
    ``activation_checkpointing`` covers (``full``) in the backward pass; see :data:`CHECKPOINTING`."""
    model.activation_checkpointing = checkpointing == "full"
    for layer in model.modules():
        if isinstance(layer, SwinLayer):
            layer.checkpointing = checkpointing != "none"


def saved_activations(model: PCTNet, size, batch: int, bf16: bool, mode: FakeTensorMode) -> int:
    """Bytes kept for backward by one forward of the training loss (Dice + CE, deep supervision) of
    ``model`` in training mode on a (batch, 1, *size) input, on fake tensors of ``mode`` (one mode per
    model: the model caches shift masks): parameters and buffers excluded; under CPU bf16 autocast
    when ``bf16``; attention counted as the GPU's fused kernels keep it (:class:`_FusedAttention`)."""
    state = {k: mode.from_tensor(v) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    model.train()
    with mode:
        x = torch.randn(batch, 1, *size)
        labels = torch.randint(0, NUM_CLASSES, (batch, *size))

        def loss():
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast, _AttentionAsOnGPU():
                outputs = torch.func.functional_call(model, state, (x,))
            return DeepSupervisionLoss(NUM_CLASSES)(outputs, labels)

        return saved_tensor_bytes(loss, state.values())


def _saved_activation_figures(tiny: bool, size, name: str, base: dict) -> list[dict]:
    """Per-sample saved activations (GB) for fp32 / bf16 x each :data:`CHECKPOINTING`; per sample is
    the difference between batch 2 and batch 1, which leaves out what the batch shares (bf16 copies
    of the weights, the relative-position bias and shift masks of the attention)."""
    model, mode = _model(tiny), FakeTensorMode()
    results = []
    for dtype in ("fp32", "bf16"):
        figures = {}
        for checkpointing in CHECKPOINTING:
            set_checkpointing(model, checkpointing)
            one, two = (saved_activations(model, size, b, dtype == "bf16", mode) for b in (1, 2))
            figures[checkpointing] = round((two - one) / 1e9, 6), round((2 * one - two) / 1e9, 6)
        none = figures["none"][0]
        for checkpointing, (per_sample, shared) in figures.items():
            compared = checkpointing != "none"
            results.append({
                "name": f"{name}_saved_activations_{dtype}_checkpointing_{checkpointing}_per_sample",
                "value": per_sample, "unit": "GB", "baseline": none if compared else None,
                "baseline_name": "same network, no activation checkpointing" if compared else None,
                "ratio": round(none / per_sample, 3) if compared else None, "higher_is_better": False,
                "device": "cpu",
                "params": dict(base, batch=[1, 2], dtype=dtype, checkpointing=checkpointing,
                               shared_by_the_batch_gb=shared,
                               note="bytes autograd keeps for backward, counted on fake tensors; CPU "
                                    "autocast rules; attention as the GPU's fused kernels keep it; "
                                    "not comparable with peak memory, which adds weights, gradients, "
                                    "optimizer state and workspace"),
            })
    return results


def _train_step(model, loss_fn, optimizer, x, y, bf16: bool):
    def step():
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            outputs = model(x)
        loss = loss_fn(outputs, y)
        loss.backward()
        optimizer.step()
    return step


def _flops_per_sample(tiny: bool, size, device: torch.device) -> float:
    """Forward + backward FLOPs of one sample (convolutions, matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(tiny).to(device)
    x = torch.randn(1, 1, *size, device=device)
    y = torch.randint(0, NUM_CLASSES, (1, *size), device=device)
    with FlopCounterMode(display=False) as counter:
        DeepSupervisionLoss(NUM_CLASSES)(model(x), y).backward()
    return float(counter.get_total_flops())


def _measure(mode: str, tiny: bool, size, batch: int, warmup: int, steps: int, device: torch.device):
    model = _model(tiny).to(device)
    loss_fn = DeepSupervisionLoss(NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 1, *size, device=device, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch, *size), device=device, generator=gen)
    bf16 = mode.startswith("bf16")
    model.activation_checkpointing = mode == "bf16+checkpointing"
    if bf16 and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    if mode == "bf16+compile":
        model = torch.compile(model)
    step = _train_step(model, loss_fn, optimizer, x, y, bf16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / batch / 1e9 if device.type == "cuda" else None
    return seconds, peak


def run(tiny: bool = False, device: str = "cpu", modes: tuple[str, ...] | None = None) -> list[dict]:
    """Figures of the training step in each of ``modes`` (default: every mode but ``bf16+compile``,
    which :mod:`benchmarks.compile` measures with its own time allowance; fp32 alone on a CPU)."""
    dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    size = (16, 32, 32) if tiny else (64, 128, 128)
    batch = 2 if tiny else (8 if cuda else 1)
    warmup, steps = (1, 1) if tiny else ((3, 10) if cuda else (1, 1))
    default_modes = modes is None
    if default_modes:
        modes = ("fp32", "bf16", "bf16+checkpointing") if cuda else ("fp32",)
    flops = _flops_per_sample(tiny, size, dev)
    name = "pctnet_tiny" if tiny else "pctnet_paper"
    base = {"config": "tiny" if tiny else "paper (44.2 M)", "input": list(size), "classes": NUM_CLASSES,
            "batch": batch, "steps": steps, "loss": "dice+ce, deep supervision",
            "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    ref_ok = cuda and not tiny  # literature figures apply to the paper configuration on a GPU only
    results = [] if not default_modes else [{
        "name": f"{name}_train_tflop_per_sample", "value": round(flops / 1e12, 4), "unit": "TFLOP",
        "baseline": REFERENCE_TFLOP_PER_SAMPLE if not tiny else None,
        "baseline_name": "reference PCT-Net, forward + backward" if not tiny else None,
        "ratio": round(REFERENCE_TFLOP_PER_SAMPLE / (flops / 1e12), 3) if not tiny else None,
        "higher_is_better": False, "device": dev.type, "params": dict(base, note="FlopCounterMode count"),
    }]
    for mode in modes:
        seconds, peak = _measure(mode, tiny, size, batch, warmup, steps, dev)
        params = dict(base, mode=mode, seconds_per_step=round(seconds, 4),
                      channels_last_3d=mode.startswith("bf16") and cuda)
        throughput = batch / seconds
        ref = REFERENCE_H200[mode]
        results.append({
            "name": f"{name}_train_{mode}_samples_per_s", "value": round(throughput, 3), "unit": "samples/s",
            "baseline": ref[0] if ref_ok else None, "baseline_name": ref[2] if ref_ok else None,
            "ratio": round(throughput / ref[0], 3) if ref_ok else None, "higher_is_better": True,
            "device": dev.type, "params": params,
        })
        if peak is not None:
            results.append({
                "name": f"{name}_train_{mode}_peak_memory_per_sample", "value": round(peak, 3), "unit": "GB",
                "baseline": ref[1] if ref_ok else None, "baseline_name": ref[2] if ref_ok else None,
                "ratio": round(ref[1] / peak, 3) if ref_ok else None, "higher_is_better": False,
                "device": dev.type, "params": dict(params, note="torch.cuda.max_memory_allocated / batch"),
            })
        results.append({
            "name": f"{name}_train_{mode}_tflops", "value": round(flops * batch / seconds / 1e12, 4),
            "unit": "TFLOP/s", "baseline": None, "baseline_name": None, "ratio": None,
            "higher_is_better": True, "device": dev.type, "params": params,
        })
    if not cuda and default_modes:  # device-independent; a GPU run spends its time on the GPU figures
        results += _saved_activation_figures(tiny, size, name, base)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small network and input, seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(run(tiny=args.tiny, device=args.device), indent=1))
