"""Batched augmentation: grid-mode views (resized crops, contrast, gamma, inversion) and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volumefusion.augment import (
    ViewParams,
    _resize_windows_cpu,
    _resize_windows_sampled,
    augment_segmentation,
    contrast_gamma_,
    draw_view_params,
    fusion_views,
    percentiles,
    uniform_int,
)

RESIZERS = [_resize_windows_cpu, _resize_windows_sampled]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uniform_integers_cover_the_inclusive_range_evenly():
    values = uniform_int(torch.tensor([2, -3]), torch.tensor([5, -3]), (4000, 2), gen())
    assert set(values[:, 1].tolist()) == {-3}
    counts = torch.bincount(values[:, 0] - 2)
    assert counts.shape == (4,) and counts.min() > 900


def test_view_windows_follow_the_scale_range_and_fit_the_source():
    params = draw_view_params(2000, (24, 48, 48), (16, 32, 32), gen())
    ratio = params.size.double() / torch.tensor([16, 32, 32])
    assert ratio.min() >= 0.68 and ratio.max() <= 1.5
    assert bool((params.start >= 0).all())
    assert bool((params.start + params.size <= torch.tensor([24, 48, 48])).all())
    assert 0.45 < params.flip.double().mean() < 0.55
    assert params.gamma.min() >= 0.7 and params.gamma.max() < 1.5


@pytest.mark.parametrize("resize", RESIZERS)
def test_resized_windows_sample_the_window_linearly(resize):
    # Linear interpolation of a ramp is exact: output voxel k of an axis must hold the window
    # position clamp((k + 0.5) * size / out - 0.5, 0, size - 1), mirrored when flipped.
    source, out = (20, 30, 40), (8, 12, 16)
    params = draw_view_params(6, source, out, gen(1))
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = source[axis]
        ramp = torch.arange(source[axis], dtype=torch.float32).view(shape).expand(source)
        resized = resize(ramp.expand(6, 1, *source).contiguous(), params, out)
        for i in range(6):
            size, start = float(params.size[i, axis]), float(params.start[i, axis])
            at = ((torch.arange(out[axis]) + 0.5) * size / out[axis] - 0.5).clamp(0, size - 1) + start
            at = at.flip(0) if params.flip[i, axis] else at
            line = resized[i, 0].movedim(axis, 0).reshape(out[axis], -1)
            torch.testing.assert_close(line, at[:, None].float().expand_as(line), atol=1e-3, rtol=0)


def test_both_resizers_agree_on_random_data():
    x = torch.randn(4, 2, 20, 30, 40)
    params = draw_view_params(4, (20, 30, 40), (10, 24, 32), gen(2))
    torch.testing.assert_close(_resize_windows_cpu(x, params, (10, 24, 32)),
                               _resize_windows_sampled(x, params, (10, 24, 32)), atol=1e-4, rtol=0)


def test_percentiles_are_nearest_ranks_of_the_strided_grid():
    x = torch.randn(3, 1, 64, 96, 96)
    low, high = torch.tensor([0.1, 1.0, 2.0]), torch.tensor([98.0, 99.0, 99.9])
    got_low, got_high = percentiles(x, low, high)
    for i in range(3):
        grid = np.sort(x[i, 0, ::2, ::3, ::3].numpy().ravel())
        last = grid.size - 1
        assert got_low[i] == grid[round(float(low[i]) / 100 * last)]
        assert got_high[i] == grid[round(float(high[i]) / 100 * last)]


def test_contrast_stretch_clips_the_tails_and_gamma_bends_the_middle():
    x = torch.linspace(-1, 1, 16 * 16 * 16).view(1, 1, 16, 16, 16).repeat(3, 1, 1, 1, 1)
    params = ViewParams(start=None, size=None, flip=None,
                        percentiles=torch.tensor([[2.0, 98.0]] * 3, dtype=torch.float64),
                        gamma=torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    low, high = percentiles(x, params.percentiles[:, 0], params.percentiles[:, 1])
    y = contrast_gamma_(x.clone(), params, invert=torch.tensor([False, True, False]))
    assert y.min() == -1 and y.max() == 1
    plain, inverted, bent = y[0].flatten(), y[1].flatten(), y[2].flatten()
    flat = x[0].flatten()
    assert bool((plain[flat <= low[0]] == -1).all()) and bool((plain[flat >= high[0]] == 1).all())
    torch.testing.assert_close(inverted, -plain)
    inside = (x[0].flatten() > low[0]) & (x[0].flatten() < high[0])
    v = (plain[inside] + 1) / 2
    torch.testing.assert_close((bent[inside] + 1) / 2, v**2, atol=1e-5, rtol=1e-4)
    assert bool((torch.diff(plain) >= 0).all())


def test_fusion_views_are_reproducible_shaped_and_in_range():
    background, foreground = torch.rand(4, 1, 24, 48, 48) * 2 - 1, torch.rand(4, 1, 24, 48, 48) * 2 - 1
    first = fusion_views(background, foreground, gen(1), (16, 32, 32))
    again = fusion_views(background, foreground, gen(1), (16, 32, 32))
    other = fusion_views(background, foreground, gen(2), (16, 32, 32))
    assert first[0].shape == (4, 1, 16, 32, 32) and first[1].shape == (4, 1, 16, 32, 32)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].min() >= -1 and first[0].max() <= 1


def test_views_of_both_crops_are_inverted_together_a_quarter_of_the_time():
    # A ramp along z, unflipped, keeps its direction unless inverted: the sign of the correlation of
    # each view with z says whether it was inverted; the two views of a sample must agree.
    n, source = 400, (12, 8, 8)
    ramp = torch.arange(12.0).view(1, 1, 12, 1, 1).expand(n, 1, *source).contiguous()
    generator = gen(3)
    draws = generator.get_state()
    views = fusion_views(ramp, ramp, generator, source)
    generator.set_state(draws)
    flips = [draw_view_params(n, source, source, generator).flip[:, 0] for _ in range(2)]
    signs = []
    for view, flip in zip(views, flips):
        slope = view[:, 0, -1].mean((1, 2)) - view[:, 0, 0].mean((1, 2))
        signs.append((slope > 0) ^ flip)
    assert torch.equal(signs[0], signs[1])
    assert 0.18 < (~signs[0]).double().mean() < 0.32


def test_identity_augmentation_keeps_image_and_label():
    image, label = torch.randn(2, 1, 8, 12, 10), torch.randint(0, 3, (2, 1, 8, 12, 10), dtype=torch.uint8)
    out_image, out_label = augment_segmentation(image, label, gen(), mirror_axes=(), rotate_deg=(0, 0, 0),
                                                scale=(1.0, 1.0), intensity=False)
    torch.testing.assert_close(out_image, image, atol=1e-5, rtol=0)
    assert out_label.dtype == torch.uint8 and torch.equal(out_label, label)


def test_flips_move_image_and_label_together():
    image = torch.randn(8, 1, 6, 8, 10)
    label = torch.randint(0, 4, (8, 1, 6, 8, 10))
    out_image, out_label = augment_segmentation(image, label, gen(1), rotate_deg=(0, 0, 0), scale=(1.0, 1.0),
                                                intensity=False)
    seen = set()
    for i in range(8):
        match = [dims for dims in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
                 if torch.equal(out_label[i], label[i].flip([d - 1 for d in dims]))
                 and torch.allclose(out_image[i], image[i].flip([d - 1 for d in dims]), atol=1e-5)]
        assert match
        seen.add(match[0])
    assert len(seen) > 1


def test_mirror_axes_limits_flips_to_the_named_axes():
    # x carries left/right: with mirror_axes=(0, 1) no sample may come out mirrored along x.
    image = torch.randn(16, 1, 6, 8, 10)
    label = torch.randint(0, 4, (16, 1, 6, 8, 10))
    out_image, out_label = augment_segmentation(image, label, gen(1), mirror_axes=(0, 1), rotate_deg=(0, 0, 0),
                                                scale=(1.0, 1.0), intensity=False)
    seen = set()
    for i in range(16):
        match = [dims for dims in [(), (1,), (2,), (1, 2), (3,), (1, 3), (2, 3), (1, 2, 3)]
                 if torch.equal(out_label[i], label[i].flip(list(dims)))]
        assert len(match) == 1 and 3 not in match[0]
        seen.add(match[0])
    assert len(seen) == 4  # z and y flips still happen, in every combination


def test_rotation_and_zoom_keep_labels_aligned_with_the_image():
    label = torch.zeros(4, 1, 8, 32, 32, dtype=torch.long)
    label[:, :, 2:6, 8:20, 10:26] = 1
    label[:, :, 3:7, 18:28, 4:12] = 2
    out_image, out_label = augment_segmentation(label.float(), label, gen(2), rotate_deg=(30, 0, 0),
                                                intensity=False)
    assert not torch.equal(out_label, label)
    assert set(out_label.unique().tolist()) <= {0, 1, 2}
    agree = ((out_image - out_label.float()).abs() < 0.5).double().mean()
    assert agree > 0.9


def test_augmentation_is_reproducible_and_intensity_changes_images():
    image, label = torch.randn(8, 1, 8, 16, 16), torch.randint(0, 2, (8, 1, 8, 16, 16))
    before = image.clone()
    first = augment_segmentation(image, label, gen(4))
    again = augment_segmentation(image, label, gen(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    spatial_only = augment_segmentation(image, label, gen(4), intensity=False)
    assert torch.equal(first[1], spatial_only[1])
    assert not torch.allclose(first[0], spatial_only[0])
    assert torch.equal(image, before)  # inputs are left alone
