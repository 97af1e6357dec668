"""PCT-Net training step under ``torch.compile`` (bf16 + channels_last_3d, CUDA only).

Measured apart from :mod:`benchmarks.network` because compiling the paper model takes minutes (more
than 150 s on an H200, 444 s for a first step on a 2-core CPU): ``gpu_check.sh`` gives this module
its own time allowance, so a slow compile never costs the other figures. On a CPU it returns no
figures (the compile time alone would exceed any benchmark budget; BENCHMARKS.md's notes hold the
CPU measurement). Figures and baselines are the network module's ``bf16+compile`` rows.
"""

from __future__ import annotations

import torch

from benchmarks import network


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return []
    return network.run(tiny=tiny, device=device, modes=("bf16+compile",))
