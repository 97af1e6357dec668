"""Sliding-window inference: window placement, Gaussian weighting, slab assembly, TTA, deep supervision."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from volumefusion import VolumeFusionError
from volumefusion.infer import (
    importance_map,
    sliding_window_inference,
    sliding_window_segmentation,
    window_starts,
)


def _net(kernel: int, classes: int = 3, seed: int = 0) -> nn.Module:
    """A tiny translation-equivariant network (receptive field ``kernel``), deterministic weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 6, kernel, padding=kernel // 2), nn.Tanh(), nn.Conv3d(6, classes, 1))


def _image(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *shape), generator=g) * 2 - 1


def _full_forward(model, image):
    with torch.no_grad():
        return model(image)[0].softmax(0)


class WindowMean(nn.Module):
    """Logits constant over each window, set by the window's mean intensity: exposes the weighting."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        return torch.cat([torch.zeros_like(m), 4 * m], dim=1).expand(-1, -1, *x.shape[2:])


class DeepSupervised(nn.Module):
    """Returns [full, 1/2] in deep-supervision mode like the project's networks."""

    def __init__(self):
        super().__init__()
        self.deep_supervision = True
        self.size_divisor = (2, 4, 4)
        self.head = _net(1)

    def forward(self, x):
        full = self.head(x)
        return [full, full[:, :, ::2, ::2, ::2] * 0] if self.deep_supervision else full


def test_window_starts_cover_the_axis_evenly_with_the_requested_overlap():
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert max(np.diff(starts)) <= 16
    assert window_starts(20, 32, 0.5) == [0]
    assert window_starts(64, 32, 0.0) == [0, 32]


def test_an_overlap_near_one_gives_each_position_once():
    assert window_starts(48, 32, 0.9999) == list(range(17))  # not 5,002 windows on 17 positions


def test_importance_map_is_a_gaussian_with_sigma_one_eighth_of_the_patch():
    patch = (9, 17, 33)
    g = importance_map(patch, torch.device("cpu"))
    assert g.shape == patch and g.max() == pytest.approx(1.0)
    centre = [p // 2 for p in patch]
    for axis, p in enumerate(patch):
        profile = g[tuple(slice(None) if a == axis else centre[a] for a in range(3))]
        expected = np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (p / 8)) ** 2)
        np.testing.assert_allclose(profile.numpy(), expected, rtol=1e-5)


def test_pointwise_network_gives_exactly_the_full_volume_forward_on_any_shape():
    # Shape not divisible by the patch, and smaller than the patch along z (padding path).
    model = _net(1)
    image = _image((7, 45, 37))
    probs = sliding_window_inference(model, image, (8, 16, 16), 3, overlap=0.5, window_batch=3)
    assert probs.shape == (3, 7, 45, 37)
    torch.testing.assert_close(probs, _full_forward(model, image), atol=1e-5, rtol=1e-5)


def test_convolutional_network_matches_the_full_volume_forward_away_from_borders():
    model = _net(3)
    image = _image((30, 41, 35))
    probs = sliding_window_inference(model, image, (12, 16, 16), 3, overlap=0.5, window_batch=4)
    full = _full_forward(model, image)
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    # Voxels near a window face (where zero padding differs) get tiny Gaussian weights there.
    torch.testing.assert_close(probs[inner], full[inner], atol=5e-3, rtol=0)


def test_overlapping_windows_are_averaged_with_gaussian_weights():
    shape, patch, overlap = (6, 20, 24), (6, 8, 8), 0.5
    image = _image(shape, seed=3)
    probs = sliding_window_inference(WindowMean(), image, patch, 2, overlap=overlap, window_batch=5)

    num = np.zeros(shape)
    den = np.zeros(shape)
    g = importance_map(patch, torch.device("cpu")).double().numpy()
    starts = [window_starts(n, p, overlap) for n, p in zip(shape, patch)]
    for z, y, x in itertools.product(*starts):
        box = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        m = image[0, 0][box].double().mean().item()
        p1 = 1 / (1 + np.exp(-4 * m))  # softmax of (0, 4m), class 1
        num[box] += g * p1
        den[box] += g
    np.testing.assert_allclose(probs[1].numpy(), num / den, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window_batch", [1, 5, 64])
def test_slab_by_slab_labels_equal_the_argmax_of_the_full_probabilities(window_batch):
    # Tall volume: many z positions, so the ring buffer wraps and slabs are finished many times.
    model = _net(3, classes=4)
    image = _image((53, 20, 18), seed=1)
    full = sliding_window_inference(model, image, (8, 16, 16), 4, overlap=0.5, window_batch=7)
    labels, probs = sliding_window_segmentation(model, image, (8, 16, 16), 4, probabilities=True,
                                                overlap=0.5, window_batch=window_batch)
    assert labels.dtype == torch.uint8 and labels.shape == (53, 20, 18)
    assert probs.dtype == torch.float16
    torch.testing.assert_close(probs.float(), full, atol=2e-3, rtol=0)
    agree = (labels.long() == full.argmax(0)).float().mean().item()
    assert agree > 0.999  # ties at float rounding may flip a voxel


def test_mirror_tta_with_a_flip_equivariant_network_changes_nothing():
    model = _net(3)
    with torch.no_grad():  # a kernel symmetric under every axis flip
        w = model[0].weight
        w.copy_(sum(w.flip(dims) for r in range(4) for dims in itertools.combinations((2, 3, 4), r)) / 8)
    image = _image((16, 24, 24), seed=2)
    plain = sliding_window_inference(model, image, (8, 16, 16), 3)
    mirrored = sliding_window_inference(model, image, (8, 16, 16), 3, tta=True)
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tta,axes", [(True, (2, 3, 4)), ((1, 2), (3, 4))])
def test_mirror_tta_averages_the_flipped_predictions(tta, axes):
    model = _net(3)
    image = _image((8, 16, 16), seed=4)  # one window, so flipping does not move windows
    expected = torch.stack([
        _full_forward(model, image.flip(dims)).flip([d - 1 for d in dims])
        for r in range(len(axes) + 1) for dims in itertools.combinations(axes, r)
    ]).mean(0)
    got = sliding_window_inference(model, image, (8, 16, 16), 3, tta=tta)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _full_forward(model, image), atol=1e-3)


def test_deep_supervision_uses_the_full_resolution_output_and_restores_the_model():
    model = DeepSupervised().train()
    image = _image((8, 16, 16))
    probs = sliding_window_inference(model, image, (8, 16, 16), 3)
    torch.testing.assert_close(probs, _full_forward(model.head, image), atol=1e-5, rtol=1e-5)
    assert model.deep_supervision is True and model.training


def test_patch_not_a_multiple_of_the_size_divisor_is_an_error():
    with pytest.raises(VolumeFusionError, match="size divisor"):
        sliding_window_inference(DeepSupervised(), _image((8, 16, 16)), (8, 16, 10), 3)


def test_wrong_number_of_classes_is_an_error():
    with pytest.raises(VolumeFusionError, match="outputs 3 channels"):
        sliding_window_inference(_net(1), _image((8, 16, 16)), (8, 16, 16), 5)
