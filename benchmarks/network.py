"""PCT-Net training step: throughput, peak memory per sample and achieved TFLOP/s.

Paper configuration (44.2 M parameters) at [64, 128, 128], 5 classes, Dice + CE with deep
supervision, Adam; random inputs and labels on the device (no data loading). Modes: fp32; bf16
(autocast, channels_last_3d, cuDNN benchmark); bf16 + torch.compile (CUDA only). The baselines are
the reference MIS-FM implementation as measured on an H200 (issue 9), for calibration only: they
come from another card whenever this one is not an H200.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from volumefusion.nets import PCTNet
from volumefusion.train.losses import DeepSupervisionLoss

# reference PCT-Net, H200: (samples/s, GB per sample) per mode, and FLOPs of forward + backward
REFERENCE_H200 = {
    "fp32": (14.1, 8.5, "reference PCT-Net, fp32, batch 4 (measured on H200)"),
    "bf16": (18.4, 5.0, "reference PCT-Net, bf16 autocast + cuDNN benchmark, batch 8 (measured on H200)"),
    "bf16+compile": (38.6, 4.3, "reference PCT-Net, bf16 + channels_last_3d + torch.compile, batch 8 "
                                "(measured on H200)"),
}
REFERENCE_TFLOP_PER_SAMPLE = 2.13
NUM_CLASSES = 5


def _model(tiny: bool) -> PCTNet:
    torch.manual_seed(0)
    if tiny:
        return PCTNet(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=2)
    return PCTNet()


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


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    dev = torch.device("cuda" if device.startswith("cuda") else "cpu")
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    size = (16, 32, 32) if tiny else (64, 128, 128)
    batch = 2 if tiny else (8 if cuda else 1)
    warmup, steps = (1, 1) if tiny else ((3, 10) if cuda else (1, 1))
    modes = ("fp32", "bf16", "bf16+compile") if cuda else ("fp32",)
    flops = _flops_per_sample(tiny, size, dev)
    name = "pctnet_tiny" if tiny else "pctnet_paper"
    base = {"config": "tiny" if tiny else "paper (44.2 M)", "input": list(size), "classes": NUM_CLASSES,
            "batch": batch, "steps": steps, "loss": "dice+ce, deep supervision",
            "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    ref_ok = cuda and not tiny  # literature figures apply to the paper configuration on a GPU only
    results = [{
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
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small network and input, seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(run(tiny=args.tiny, device=args.device), indent=1))
