"""Profile one PCT-Net training step and rank its kernels: where the time of a step goes.

Paper configuration at [64, 128, 128] (``--tiny``: a small network at [16, 32, 32]), 5 classes,
Dice + CE with deep supervision, Adam, bf16 autocast + channels_last_3d on a GPU (fp32 on a CPU).
Prints the ``torch.profiler`` table of the most expensive operators (device time on a GPU, CPU
time otherwise) and, with ``--out``, writes it with the per-operator figures as JSON.

    python -m benchmarks.profile_step [--tiny] [--device auto|cpu|cuda] [--batch N] [--out prof.json]

Not a benchmark module (``python -m benchmarks`` does not run it): a step under the profiler is
slower than without it, so its figures explain a step rather than time it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from volumefusion.nets import PCTNet
from volumefusion.train.losses import DeepSupervisionLoss

NUM_CLASSES = 5


def profile_step(tiny: bool, device: torch.device, batch: int, warmup: int = 3, steps: int = 2,
                 rows: int = 25) -> dict:
    """Profile ``steps`` training steps after ``warmup``; returns the table and the top ``rows`` operators."""
    torch.manual_seed(0)
    model = PCTNet(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=2) if tiny else PCTNet()
    size = (16, 32, 32) if tiny else (64, 128, 128)
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last_3d if cuda else torch.preserve_format)
    x = torch.randn(batch, 1, *size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        torch.backends.cudnn.benchmark = True
    y = torch.randint(0, NUM_CLASSES, (batch, *size), device=device)
    loss_fn = DeepSupervisionLoss(NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in averages) or 1.0
    top = [{"name": e.key, "calls": e.count, "ms_per_step": getattr(e, key) / 1e3 / steps,
            "share": getattr(e, key) / total} for e in averages[:rows]]
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "tiny": tiny, "batch": batch,
            "input": list(size), "precision": "bf16 + channels_last_3d" if cuda else "fp32",
            "ms_per_step_total": total / 1e3 / steps, "top": top,
            "table": prof.key_averages().table(sort_by=key, row_limit=rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small network and input: finishes in seconds")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: 8 on a GPU, else 1)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    batch = args.batch or (8 if device.type == "cuda" else 1)
    result = profile_step(args.tiny, device, batch)
    print(result["table"])
    print(f"{result['ms_per_step_total']:.1f} ms of profiled operator time per step on {result['device']}")
    if args.out:
        from volumefusion.files import atomic_write_text

        atomic_write_text(args.out, json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
