"""Sliding-window inference and predict on CUDA: bf16 and channels_last agree with fp32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volumefusion.infer import Predictor, sliding_window_inference, sliding_window_segmentation
from volumefusion.nets import PCTNet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pctnet() -> PCTNet:
    torch.manual_seed(0)
    return PCTNet(num_classes=4, feature_channels=(8, 16, 32, 64, 128), num_heads=(2, 4, 8),
                  dropout=(0, 0, 0, 0, 0), drop_path=0.0).eval()


def _image(shape=(40, 150, 130)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.rand((1, 1, *shape), generator=g), 5, 1, 2)
    return smooth * 4 - 2


def test_bf16_channels_last_on_gpu_matches_fp32_on_cpu():
    model = _pctnet()
    image = _image()
    cpu = sliding_window_inference(model, image, (16, 64, 64), 4, precision="fp32")
    gpu_model = _pctnet().cuda().to(memory_format=torch.channels_last_3d)
    gpu = sliding_window_inference(gpu_model, image, (16, 64, 64), 4, device="cuda", precision="auto",
                                   channels_last=True)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert (gpu - cpu).abs().max() < 0.05  # bf16 logits
    assert (gpu.argmax(0) == cpu.argmax(0)).float().mean() > 0.98


def test_slab_labels_on_gpu_equal_the_argmax_of_the_probabilities_with_tta():
    model = _pctnet().cuda()
    image = _image((56, 96, 96)).cuda()
    probs = sliding_window_inference(model, image, (16, 64, 64), 4, tta=True, window_batch=3)
    labels, _ = sliding_window_segmentation(model, image, (16, 64, 64), 4, tta=True, window_batch=5)
    assert (labels.long() == probs.argmax(0)).float().mean() > 0.999


def test_predict_on_gpu_gives_the_same_labels_as_on_cpu(tmp_path):
    from volumefusion import config
    from volumefusion.checkpoint import save_checkpoint
    from volumefusion.data.phantoms import make_phantom
    from volumefusion.io import Geometry
    from volumefusion.nets import build_model
    from volumefusion.preprocess import PrepareSettings

    cfg = config.load(overrides=["model.feature_channels=[8,16,32,64,128]", "model.num_heads=[2,4,8]",
                                 "data.crop_size=[16,64,64]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 8)
    task = {"kind": "segmentation", "num_classes": 8, "label_names": None,
            "preprocessing": PrepareSettings().to_dict()}
    payload = {"model": model.state_dict(), "config": cfg.to_dict(), "task": task}
    save_checkpoint(tmp_path / "ckpt.pt", payload)
    phantom = make_phantom(0, shape=(40, 128, 112))
    geometry = Geometry(phantom.image.shape, phantom.spacing_zyx, (0.0, 0.0, 0.0))
    cpu, _ = Predictor.from_checkpoint(tmp_path / "ckpt.pt", "cpu").predict(phantom.image, geometry)
    gpu_predictor = Predictor.from_checkpoint(tmp_path / "ckpt.pt", "cuda")
    gpu, probs = gpu_predictor.predict(phantom.image, geometry, probabilities=True)
    assert gpu_predictor.channels_last and gpu.shape == geometry.shape_zyx
    assert np.mean(gpu == cpu) > 0.98
    assert probs.shape == (8, *geometry.shape_zyx) and probs.dtype == np.uint8
