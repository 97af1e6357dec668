"""Volume Fusion throughput: fused samples/s of ``make_fused_batch`` on the given device, boxes mode
and grid mode (views + fusion), against straightforward numpy baselines timed in the same run.

Baselines (CPU, one sample at a time, like the reference code): boxes mode paints the class map box
by box with slice assignments and then fuses; grid mode makes each view with ``scipy.ndimage.zoom``
(order 1) of a random window, ``np.flip``, ``np.percentile`` contrast, ``np.power`` gamma and joint
inversion, then paints the block grid block by block and fuses.

On a CPU ours runs on one thread, like the baseline, and the grid pipeline is also reported as CPU
seconds per sample (= per core), the figure the issue compares with the reference's 0.34 s per
sample per core. On a GPU ours uses the default threads for its few CPU-side draws.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from volumefusion.augment import GAMMA_RANGE, INVERT_PROB, PERCENTILE_HIGH, PERCENTILE_LOW, SCALE_RANGE
from volumefusion.fusion import FusionConfig, make_fused_batch, source_shape

REFERENCE_S_PER_SAMPLE_CORE = 0.34  # PyMIC crop4vf + VolumeFusion, [64, 128, 128], per the issue


def _paint_boxes_numpy(rng: np.random.Generator, shape, cfg: FusionConfig) -> np.ndarray:
    k = cfg.num_classes - 1
    labels = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(cfg.num_boxes[0], cfg.num_boxes[1] + 1)):
        box = []
        for axis, length in enumerate(shape):
            side = int(rng.integers(int(cfg.box_size_min[axis]), int(cfg.box_size_max[axis]) + 1))
            first = int(rng.integers(length)) - side // 2
            box.append(slice(max(first, 0), min(first + side, length)))
        labels[tuple(box)] = rng.integers(1, k + 1)
    return labels


def _paint_grid_numpy(rng: np.random.Generator, shape, cfg: FusionConfig) -> np.ndarray:
    k = cfg.num_classes - 1
    block = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(cfg.grid_block_min, cfg.grid_block_max)]
    offset = [int(rng.integers(0, s % b + 1)) for s, b in zip(shape, block)]
    counts = [s // b for s, b in zip(shape, block)]
    total = math.prod(counts)
    chosen = np.zeros(total, bool)
    chosen[:int(round(cfg.grid_foreground_ratio * total))] = True
    rng.shuffle(chosen)
    labels = np.zeros(shape, np.uint8)
    for index in np.flatnonzero(chosen):
        a, b, c = np.unravel_index(index, counts)
        z, y, x = (o + i * s for o, i, s in zip(offset, (a, b, c), block))
        labels[z:z + block[0], y:y + block[1], x:x + block[2]] = rng.integers(1, k + 1)
    return labels


def _view_numpy(rng: np.random.Generator, volume: np.ndarray, out) -> np.ndarray:
    from scipy import ndimage

    size = [min(int(o * rng.uniform(*SCALE_RANGE)), s) for o, s in zip(out, volume.shape)]
    start = [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, size)]
    window = volume[tuple(slice(a, a + c) for a, c in zip(start, size))]
    view = ndimage.zoom(window, [o / c for o, c in zip(out, size)], order=1)
    flips = [axis for axis in range(3) if rng.random() < 0.5]
    view = np.flip(view, flips) if flips else view
    low, high = np.percentile(view, [rng.uniform(*PERCENTILE_LOW), rng.uniform(*PERCENTILE_HIGH)])
    view = np.clip((view - low) / max(high - low, 1e-6), 0, 1)
    return np.power(view, rng.uniform(*GAMMA_RANGE))


def baseline_boxes(background: np.ndarray, foreground: np.ndarray, cfg: FusionConfig, rng) -> np.ndarray:
    """``(N, D, H, W)`` float32 crops -> fused crops, one sample and one box at a time."""
    fused = np.empty_like(background)
    for i in range(background.shape[0]):
        alpha = _paint_boxes_numpy(rng, background.shape[1:], cfg) / np.float32(cfg.num_classes - 1)
        fused[i] = alpha * foreground[i] + (1 - alpha) * background[i]
    return fused


def baseline_grid(background: np.ndarray, foreground: np.ndarray, cfg: FusionConfig, rng, out) -> np.ndarray:
    """``(N, D', H', W')`` float32 source crops -> fused ``(N, *out)`` crops, one sample at a time."""
    fused = np.empty((background.shape[0], *out), np.float32)
    for i in range(background.shape[0]):
        views = [_view_numpy(rng, v[i], out) for v in (background, foreground)]
        if rng.random() < INVERT_PROB:
            views = [1 - v for v in views]
        alpha = _paint_grid_numpy(rng, out, cfg) / np.float32(cfg.num_classes - 1)
        fused[i] = alpha * views[1] + (1 - alpha) * views[0]
    return fused


def _time(fn, repeats: int, cuda: bool) -> tuple[float, float]:
    """Seconds per call of ``fn()`` after a warm-up call: wall-clock and CPU (all threads).

    On a GPU: the mean of ``repeats`` back-to-back calls (launches overlap earlier kernels, as in a
    training step). On a CPU: the fastest of ``repeats`` calls, the least disturbed by other work on
    the machine.
    """
    fn()
    if cuda:
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def _figures(mode: str, crop, batch: int, repeats: int, dev: torch.device, full_size: bool) -> list[dict]:
    cuda = dev.type == "cuda"
    # On a CPU ours runs on one thread, like the single-threaded numpy baseline: figures per core.
    threads = torch.get_num_threads() if cuda else 1
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = FusionConfig(mode=mode)
    source = source_shape(crop, cfg)
    background = torch.rand((batch, 1, *source), device=dev) * 2 - 1
    foreground = torch.rand((batch, 1, *source), device=dev) * 2 - 1
    out = crop if mode == "grid" else None

    def ours():
        return make_fused_batch(background, foreground, cfg, generator, out_shape=out)

    bg, fg = background[:, 0].cpu().numpy(), foreground[:, 0].cpu().numpy()

    def baseline():
        if mode == "boxes":
            return baseline_boxes(bg, fg, cfg, rng)
        return baseline_grid(bg, fg, cfg, rng, crop)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wall, cpu = _time(ours, repeats, cuda)
    finally:
        torch.set_num_threads(previous)
    base_wall, base_cpu = _time(baseline, 1, False)
    params = {"crop": list(crop), "source": list(source), "batch": batch, "threads": threads,
              "repeats": repeats, "baseline_device": "cpu", "baseline_threads": 1}
    figures = [{"name": f"fusion_{mode}_samples_per_s", "value": batch / wall, "unit": "samples/s",
                "baseline": batch / base_wall,
                "baseline_name": f"numpy per-sample loop ({mode}, reference style)",
                "ratio": base_wall / wall, "higher_is_better": True, "device": dev.type, "params": params}]
    if not cuda and mode == "grid":
        per_core, base_core = cpu / batch, base_cpu / batch
        extra = {}
        if full_size:
            extra = {"issue_reference_s": REFERENCE_S_PER_SAMPLE_CORE,
                     "speedup_vs_issue_reference": REFERENCE_S_PER_SAMPLE_CORE / per_core}
        figures.append({
            "name": "fusion_grid_cpu_s_per_sample_core", "value": per_core, "unit": "s/sample/core",
            "baseline": base_core, "baseline_name": "numpy per-sample pipeline (reference style), 1 core",
            "ratio": base_core / per_core, "higher_is_better": False, "device": "cpu",
            "params": {**params, **extra}})
    return figures


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    dev = torch.device(device)
    repeats = 20 if dev.type == "cuda" else 3
    crop, batch, repeats = ((16, 32, 32), 2, 1) if tiny else ((64, 128, 128), 16, repeats)
    return [f for mode in ("boxes", "grid") for f in _figures(mode, crop, batch, repeats, dev, not tiny)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small crops and batch: finishes in seconds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(json.dumps(run(args.tiny, args.device), indent=1))
