"""Shared fixtures: tiny stores of phantom CT and a tiny network configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Reference checkpoint data beside the checkout (../shared/conformance); tests that need it skip without it.
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"

# Small, fast PCT-Net: divisible crops of [16, 32, 32] reach 2x2x2 at the bottom.
TINY_MODEL = [
    "model.feature_channels=[4,8,16,32,64]",
    "model.num_heads=[2,4,8]",
    "model.window_size=2",
    "data.crop_size=[16,32,32]",
    "data.workers=0",
    "run.batch_size=2",
    "run.device=cpu",
    "run.log_every=1",
    "run.val_samples=4",
]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory):
    """A store of three unlabelled [24, 48, 48] phantoms."""
    from volumefusion.data.phantoms import write_phantoms
    from volumefusion.data.prepare import prepare
    from volumefusion.preprocess import PrepareSettings

    root = tmp_path_factory.mktemp("phantoms")
    files = write_phantoms(root / "raw", seeds=[1, 2, 3], shape=(24, 48, 48), with_labels=False)
    summary = prepare([str(p) for p in files], root / "store", PrepareSettings())
    assert not summary.failed
    return root / "store"


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """An MSD-style labelled dataset of four [24, 48, 48] phantoms."""
    from volumefusion.data.phantoms import write_msd_dataset

    root = tmp_path_factory.mktemp("msd")
    return write_msd_dataset(root / "Task01_Phantom", seeds=[11, 12, 13, 14], shape=(24, 48, 48))
