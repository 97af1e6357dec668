"""Sliding-window prediction of a whole CT: seconds per case, ours vs MONAI's ``sliding_window_inference``.

Both run the same network with the same patch ([64, 128, 128]), overlap (0.5, which gives both the
same window count), window batch (4) and Gaussian blending (sigma = patch / 8), produce softmax
probabilities of the whole volume on the compute device, and run under ``torch.inference_mode``
with cuDNN autotuning on. Ours runs as ``volumefusion predict`` does (bf16 autocast on CUDA, fp32 on
CPU); MONAI runs in fp32 and, for a like-for-like comparison, also under bf16 autocast (CUDA only).
Input: random values in [-1, 1] (the cost does not depend on the content).

Sizes: CUDA, the issue's 512 x 512 x 200 volume with the paper PCT-Net (5 classes). On CPU that
takes hours, so the full-size CPU run uses a 192 x 192 x 64 volume and a narrower PCT-Net
(channels 8 ... 128); ``tiny`` uses a tiny net and volume. ``params`` says which. Each method is
timed ``repeats`` times, interleaved in alternating order, and the best time counts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from volumefusion.infer import sliding_window_inference
from volumefusion.nets import PCTNet

NUM_CLASSES = 5
OVERLAP = 0.5
WINDOW_BATCH = 4


def _setup(tiny: bool, cuda: bool) -> dict:
    """Network, volume, patch and a warm-up volume whose window batches have the same shapes as the
    timed run's (full and partial), so first-call and autotuning costs fall outside the timing."""
    if tiny:
        return {"net": dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 2, 4), window_size=2),
                "net_name": "tiny PCT-Net", "volume": (16, 40, 48), "patch": (16, 32, 32),
                "warmup_volume": (16, 32, 80), "repeats": 2}
    if cuda:  # 6 x 7 x 7 = 294 windows: batches of 4 and a last one of 2, like the warm-up's 6
        return {"net": {}, "net_name": "paper PCT-Net (44.2 M)", "volume": (200, 512, 512),
                "patch": (64, 128, 128), "warmup_volume": (64, 128, 448), "repeats": 2}
    return {"net": dict(feature_channels=(8, 16, 32, 64, 128), num_heads=(2, 4, 8)),
            "net_name": "PCT-Net, channels (8, 16, 32, 64, 128)", "volume": (64, 192, 192),
            "patch": (64, 128, 128), "warmup_volume": (64, 128, 320), "repeats": 2}


def _ours(model, image, patch, device, precision, channels_last):
    return sliding_window_inference(model, image, patch, NUM_CLASSES, overlap=OVERLAP,
                                    window_batch=WINDOW_BATCH, device=device, precision=precision,
                                    out_device=device, channels_last=channels_last)


def _monai(model, image, patch, device, bf16: bool):
    from monai.inferers import sliding_window_inference as monai_swi

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        out = monai_swi(image, patch, WINDOW_BATCH, lambda x: model(x).softmax(1), overlap=OVERLAP,
                        mode="gaussian", sigma_scale=0.125)
    return out[0]


def _timed(fn, sync) -> tuple[float, torch.Tensor]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    dev = torch.device("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    s = _setup(tiny, cuda)
    torch.manual_seed(0)
    model = PCTNet(num_classes=NUM_CLASSES, **s["net"]).to(dev).eval()
    model.deep_supervision = False  # MONAI needs a single output; ours switches it off by itself
    gen = torch.Generator(device=dev).manual_seed(0)
    image = torch.rand((1, 1, *s["volume"]), generator=gen, device=dev) * 2 - 1
    patch = s["patch"]
    ours_precision = "bf16" if cuda else "fp32"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # Ours as `predict` runs it: on CUDA the model is in channels_last_3d (a copy: MONAI gets the
    # model as a user would pass it).
    ours_model = copy.deepcopy(model).to(memory_format=torch.channels_last_3d) if cuda else model
    methods = {
        "ours": lambda x: _ours(ours_model, x, patch, dev, ours_precision, channels_last=cuda),
        "monai_fp32": lambda x: _monai(model, x, patch, dev, bf16=False),
    }
    if cuda:
        methods["ours_bf16_contiguous"] = lambda x: _ours(model, x, patch, dev, "bf16", channels_last=False)
        methods["monai_bf16"] = lambda x: _monai(model, x, patch, dev, bf16=True)

    seconds = {name: float("inf") for name in methods}
    outputs = {}
    with torch.inference_mode():
        if s["warmup_volume"] is not None:  # first-call costs, cuDNN autotuning (full and partial batches)
            warm = torch.rand((1, 1, *s["warmup_volume"]), generator=gen, device=dev) * 2 - 1
            for fn in methods.values():
                fn(warm)
            del warm
        order = list(methods)
        for _ in range(s["repeats"]):  # interleaved, order reversed each time, best of: robust to load
            for name in order:
                fn = methods[name]
                t, out = _timed(lambda fn=fn: fn(image), sync)
                seconds[name] = min(seconds[name], t)
                if name in ("ours", "monai_fp32"):
                    outputs[name] = out.float()
                del out
            order.reverse()
        # Same network and blending but window positions differ slightly (MONAI: fixed stride with
        # the last window clamped; ours: evenly spread), so probabilities agree closely, not exactly.
        diff = (outputs["ours"] - outputs["monai_fp32"]).abs().max().item()
        agree = (outputs["ours"].argmax(0) == outputs["monai_fp32"].argmax(0)).float().mean().item()
    del outputs

    d, h, w = s["volume"]
    params = {"volume_zyx": list(s["volume"]), "network": s["net_name"], "classes": NUM_CLASSES,
              "patch_zyx": list(patch), "overlap": OVERLAP, "window_batch": WINDOW_BATCH,
              "ours_precision": ours_precision, "repeats_best_of": s["repeats"],
              "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
              "threads": torch.get_num_threads(),
              "max_abs_prob_diff_vs_monai_fp32": round(diff, 4),
              "argmax_agreement_vs_monai_fp32": round(agree, 5)}
    if not tiny and not cuda:
        params["note"] = ("CPU: a smaller volume and network than the issue's 512x512x200 paper PCT-Net "
                          "(hours on a few cores); both methods run the same network")
    tag = "tiny" if tiny else f"{w}x{h}x{d}"
    results = []
    if cuda:
        params["ours_bf16_without_channels_last_s"] = round(seconds["ours_bf16_contiguous"], 3)
    for baseline in ("monai_fp32", "monai_bf16") if cuda else ("monai_fp32",):
        results.append({
            "name": f"predict_{tag}_seconds_per_case_vs_{baseline}", "value": round(seconds["ours"], 3),
            "unit": "s", "baseline": round(seconds[baseline], 3),
            "baseline_name": f"MONAI sliding_window_inference, {baseline.split('_')[1]}"
                             + (" autocast" if baseline.endswith("bf16") else ""),
            "ratio": round(seconds[baseline] / seconds["ours"], 3), "higher_is_better": False,
            "device": dev.type, "params": params,
        })
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny network and volume, seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(run(tiny=args.tiny, device=args.device), indent=1))
