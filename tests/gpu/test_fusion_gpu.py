"""Volume Fusion and augmentation on a CUDA device agree with the CPU."""

from __future__ import annotations

import pytest
import torch

from volumefusion.augment import augment_segmentation, fusion_views
from volumefusion.fusion import FusionConfig, fuse, make_fused_batch, sample_labels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CONFIGS = [
    FusionConfig(),
    FusionConfig(num_boxes=(50, 60), box_size_min=(0.1, 0.1, 0.1), box_size_max=(0.5, 0.5, 0.5)),
    FusionConfig(mode="grid"),
    FusionConfig(mode="grid", num_classes=3, grid_block_min=(2, 3, 3), grid_block_max=(9, 17, 17)),
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_same_seed_gives_the_same_class_maps_on_cpu_and_gpu(cfg):
    for seed in range(3):
        cpu = sample_labels((6, 40, 96, 80), cfg, gen(seed), "cpu")
        gpu = sample_labels((6, 40, 96, 80), cfg, gen(seed), "cuda")
        assert gpu.device.type == "cuda" and gpu.dtype == torch.long
        assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusion_on_the_gpu_matches_the_cpu(dtype):
    background, foreground = torch.randn(4, 1, 32, 64, 64), torch.randn(4, 1, 32, 64, 64)
    background, foreground = background.to(dtype), foreground.to(dtype)
    fused_cpu, labels_cpu = fuse(background, foreground, FusionConfig(), gen(1))
    fused_gpu, labels_gpu = fuse(background.cuda(), foreground.cuda(), FusionConfig(), gen(1))
    assert fused_gpu.dtype == dtype and torch.equal(labels_gpu.cpu(), labels_cpu)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused_gpu.cpu(), fused_cpu, atol=tolerance, rtol=0)


def test_grid_mode_batches_match_the_cpu():
    background = torch.rand(4, 1, 48, 96, 96) * 2 - 1
    foreground = torch.rand(4, 1, 48, 96, 96) * 2 - 1
    cfg, crop = FusionConfig(mode="grid"), (32, 64, 64)
    fused_cpu, labels_cpu = make_fused_batch(background, foreground, cfg, gen(2), out_shape=crop)
    fused_gpu, labels_gpu = make_fused_batch(background.cuda(), foreground.cuda(), cfg, gen(2),
                                             out_shape=crop)
    assert torch.equal(labels_gpu.cpu(), labels_cpu)
    difference = (fused_gpu.cpu() - fused_cpu).abs()
    assert difference.mean() < 1e-4 and difference.max() < 2e-2  # resampling kernels differ in rounding


def test_views_on_the_gpu_match_the_cpu():
    background, foreground = torch.randn(3, 1, 30, 60, 60), torch.randn(3, 1, 30, 60, 60)
    cpu = fusion_views(background, foreground, gen(3), (20, 40, 40))
    gpu = fusion_views(background.cuda(), foreground.cuda(), gen(3), (20, 40, 40))
    for a, b in zip(cpu, gpu):
        assert (a - b.cpu()).abs().mean() < 1e-4


def test_fine_tuning_augmentation_on_the_gpu_matches_the_cpu_and_repeats():
    image, label = torch.randn(2, 1, 16, 48, 48), torch.randint(0, 4, (2, 1, 16, 48, 48), dtype=torch.uint8)
    cpu = augment_segmentation(image, label, gen(4), intensity=False)
    gpu = augment_segmentation(image.cuda(), label.cuda(), gen(4), intensity=False)
    assert gpu[1].dtype == torch.uint8
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    assert (gpu[1].cpu() != cpu[1]).double().mean() < 1e-3  # nearest neighbour ties may round apart
    first = augment_segmentation(image.cuda(), label.cuda(), gen(5))
    again = augment_segmentation(image.cuda(), label.cuda(), gen(5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
