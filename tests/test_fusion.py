"""Volume Fusion: class maps, fusion maths, randomness, grid-mode batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from volumefusion import VolumeFusionError
from volumefusion.fusion import (
    BoxParams,
    FusionConfig,
    _paint_boxes,
    _select_boxes,
    blend,
    draw_boxes,
    draw_grid,
    fuse,
    fusion_pair,
    make_fused_batch,
    sample_labels,
    source_shape,
)

CROP = (16, 32, 32)
SMALL_BOXES = FusionConfig(num_boxes=(2, 6), box_size_min=(2, 4, 4), box_size_max=(8, 16, 16))
SMALL_GRID = FusionConfig(mode="grid", grid_block_min=(2, 3, 3), grid_block_max=(6, 9, 9))
CPU = torch.device("cpu")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def paint_reference(params: BoxParams, shape) -> torch.Tensor:
    """The method's definition, voxel by voxel: the class of the last box that covers the voxel."""
    n = params.count.shape[0]
    labels = torch.zeros((n, *shape), dtype=torch.long)
    for i in range(n):
        for m in range(int(params.count[i])):
            z0, y0, x0 = params.start[i, m].tolist()
            z1, y1, x1 = params.stop[i, m].tolist()
            for z in range(z0, z1):
                labels[i, z, y0:y1, x0:x1] = params.classes[i, m]
    return labels


@pytest.mark.parametrize("levels", [(0.0, 1.0), (-1.0, 1.0)])
def test_constant_crops_give_exactly_the_fused_levels(levels):
    background = torch.full((6, 1, *CROP), levels[0])
    foreground = torch.full((6, 1, *CROP), levels[1])
    fused, labels = fuse(background, foreground, FusionConfig(), gen())
    expected = torch.tensor([levels[0] + (levels[1] - levels[0]) * i / 4 for i in range(5)])
    assert torch.equal(fused[:, 0], expected[labels])


@pytest.mark.parametrize("num_classes", [2, 4, 5])
def test_alpha_zero_gives_background_and_alpha_one_foreground(num_classes):
    background, foreground = torch.randn(2, 3, *CROP), torch.randn(2, 3, *CROP)
    zero = torch.zeros((2, *CROP), dtype=torch.long)
    assert torch.equal(blend(background, foreground, zero, num_classes), background)
    assert torch.equal(blend(background, foreground, zero + num_classes - 1, num_classes), foreground)


def test_fusion_broadcasts_the_class_map_over_channels():
    background, foreground = torch.randn(3, 2, *CROP), torch.randn(3, 2, *CROP)
    fused, labels = fuse(background, foreground, FusionConfig(), gen())
    alpha = labels[:, None].double() / 4
    expected = alpha * foreground.double() + (1 - alpha) * background.double()
    assert fused.shape == background.shape
    torch.testing.assert_close(fused.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["boxes", "grid"])
def test_labels_stay_in_range_and_every_class_appears(mode):
    cfg = FusionConfig(mode=mode, num_classes=4)
    labels = sample_labels((8, 32, 64, 64), cfg, gen(), CPU)
    assert labels.dtype == torch.long and labels.shape == (8, 32, 64, 64)
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}


def test_box_counts_and_sizes_follow_the_configured_ranges():
    cfg = FusionConfig()  # 10..40 boxes, sides (8..40, 8..80, 8..80)
    boxes = draw_boxes(3000, (64, 128, 128), cfg, gen())
    counts = boxes.count.double()
    assert counts.min() == 10 and counts.max() == 40
    assert abs(counts.mean().item() - 25) < 0.6  # standard error ~0.16
    used = torch.arange(40) < boxes.count[:, None]
    for axis, (low, high) in enumerate([(8, 40), (8, 80), (8, 80)]):
        sizes = boxes.size[..., axis][used].double()
        assert sizes.min() == low and sizes.max() == high
        assert abs(sizes.mean().item() - (low + high) / 2) < 0.3
    classes = boxes.classes[used]
    assert classes.min() == 1 and classes.max() == 4
    assert bool((boxes.classes[~used] == 0).all())


def test_boxes_are_clipped_to_the_crop_around_uniform_centres():
    boxes = draw_boxes(500, CROP, SMALL_BOXES, gen())
    used = torch.arange(6) < boxes.count[:, None]
    extent = (boxes.stop - boxes.start)[used]
    assert bool((boxes.start[used] >= 0).all()) and bool((boxes.stop[used] <= torch.tensor(CROP)).all())
    assert bool((extent >= 1).all()) and bool((extent <= boxes.size[used]).all())
    clipped = (extent < boxes.size[used]).any(1).double().mean()
    assert 0.05 < clipped < 0.95  # boxes near the border are cut, others are not


def test_painted_class_maps_follow_the_boxes_in_order():
    boxes = draw_boxes(4, CROP, SMALL_BOXES, gen(3))
    expected = paint_reference(boxes, CROP)
    assert torch.equal(_paint_boxes(boxes, CROP), expected)
    assert torch.equal(_select_boxes(boxes, CROP, CPU), expected)


@pytest.mark.parametrize("raster", [_paint_boxes, lambda b, s: _select_boxes(b, s, CPU)])
def test_later_boxes_overwrite_earlier_ones(raster):
    start = torch.tensor([[[0, 0, 0], [2, 2, 2]]])
    stop = torch.tensor([[[4, 4, 4], [6, 6, 6]]])
    for classes, overlap in (([1, 2], 2), ([2, 1], 1)):
        boxes = BoxParams(torch.tensor([2]), stop - start, start, stop, torch.tensor([classes]))
        labels = raster(boxes, (8, 8, 8))
        assert int(labels[0, 3, 3, 3]) == overlap
        assert int(labels[0, 1, 1, 1]) == classes[0] and int(labels[0, 5, 5, 5]) == classes[1]
        assert int(labels[0, 7, 7, 7]) == 0


def test_many_boxes_take_several_bit_mask_passes():
    cfg = FusionConfig(num_boxes=(60, 60), box_size_min=(2, 2, 2), box_size_max=(6, 6, 6))
    boxes = draw_boxes(2, (8, 12, 12), cfg, gen(5))
    assert torch.equal(_select_boxes(boxes, (8, 12, 12), CPU), paint_reference(boxes, (8, 12, 12)))


def test_same_seed_gives_the_same_fusion_and_another_seed_a_different_one():
    background, foreground = torch.randn(2, 1, *CROP), torch.randn(2, 1, *CROP)
    for cfg in (FusionConfig(), SMALL_GRID):
        first = make_fused_batch(background, foreground, cfg, gen(1))
        again = make_fused_batch(background, foreground, cfg, gen(1))
        other = make_fused_batch(background, foreground, cfg, gen(2))
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert not torch.equal(first[1], other[1])


def test_fractional_box_sizes_scale_with_the_crop():
    cfg = FusionConfig(box_size_min=(0.25, 0.25, 0.5), box_size_max=(0.5, 0.5, 1.0))
    for scale in (1, 2):
        crop = (8 * scale, 16 * scale, 16 * scale)
        boxes = draw_boxes(400, crop, cfg, gen())
        used = torch.arange(40) < boxes.count[:, None]
        sizes = boxes.size[used]
        low = torch.tensor([2, 4, 8]) * scale
        assert torch.equal(sizes.amin(0), low) and torch.equal(sizes.amax(0), 2 * low)


def test_box_sizes_that_cannot_fit_the_crop_are_an_error():
    cfg = FusionConfig(box_size_min=(0.9, 8, 8), box_size_max=(20, 80, 80))
    with pytest.raises(VolumeFusionError, match="box_size_min"):
        draw_boxes(1, (64, 128, 128), cfg, gen())


def test_grid_blocks_follow_the_configured_ranges_and_ratio():
    cfg = FusionConfig(mode="grid")  # blocks (5..20, 8..32, 8..32), ratio 0.7
    grid = draw_grid(400, (64, 128, 128), cfg, gen())
    low, high = torch.tensor([5, 8, 8]), torch.tensor([20, 32, 32])
    assert torch.equal(grid.block.amin(0), low) and torch.equal(grid.block.amax(0), high)
    assert bool((grid.offset >= 0).all())
    assert bool((grid.offset <= torch.tensor([64, 128, 128]) % grid.block).all())
    assert torch.equal(grid.blocks, torch.tensor([64, 128, 128]) // grid.block)
    total = grid.blocks.prod(1)
    foreground = (grid.classes > 0).flatten(1).sum(1)
    assert torch.equal(foreground, torch.floor(0.7 * total + 0.5).long())


def test_grid_class_maps_paint_each_block_with_its_class():
    grid = draw_grid(3, CROP, SMALL_GRID, gen(4))
    labels = sample_labels((3, *CROP), SMALL_GRID, gen(4), CPU)
    for i in range(3):
        block, offset, blocks = grid.block[i].tolist(), grid.offset[i].tolist(), grid.blocks[i].tolist()
        voxels = [(z, y, x) for z in range(CROP[0]) for y in range(0, CROP[1], 3) for x in range(CROP[2])]
        for z, y, x in voxels:
            at = [(v - o) // b for v, o, b in zip((z, y, x), offset, block)]
            inside = all(v >= o and a < n for v, o, a, n in zip((z, y, x), offset, at, blocks))
            assert int(labels[i, z, y, x]) == (int(grid.classes[i, at[0], at[1], at[2]]) if inside else 0)


def test_grid_foreground_voxels_are_the_chosen_share_of_blocks():
    cfg = dataclasses.replace(SMALL_GRID, grid_foreground_ratio=0.3)
    grid = draw_grid(8, CROP, cfg, gen(6))
    labels = sample_labels((8, *CROP), cfg, gen(6), CPU)
    chosen = torch.floor(0.3 * grid.blocks.prod(1) + 0.5).long()
    assert torch.equal((labels > 0).flatten(1).sum(1), chosen * grid.block.prod(1))


def test_grid_mode_fuses_two_augmented_views_to_the_crop_size():
    background = torch.rand(3, 1, 24, 48, 48) * 2 - 1
    foreground = torch.rand(3, 1, 24, 48, 48) * 2 - 1
    crop = (16, 32, 32)
    assert source_shape(crop, SMALL_GRID) == (24, 48, 48)
    fused, labels = make_fused_batch(background, foreground, SMALL_GRID, gen(7), out_shape=crop)
    assert fused.shape == (3, 1, *crop) and labels.shape == (3, *crop)
    assert fused.min() >= -1 and fused.max() <= 1
    views = fusion_pair(background, foreground, SMALL_GRID, gen(7), out_shape=crop)
    k = SMALL_GRID.num_classes - 1
    assert torch.equal(fused[:, 0][labels == 0], views[0][:, 0][labels == 0])
    assert torch.equal(fused[:, 0][labels == k], views[1][:, 0][labels == k])


def test_boxes_mode_fuses_the_crops_as_they_are():
    background, foreground = torch.randn(2, 1, *CROP), torch.randn(2, 1, *CROP)
    assert source_shape(CROP, FusionConfig()) == CROP
    fused, labels = make_fused_batch(background, foreground, FusionConfig(), gen(3))
    assert torch.equal(fused[:, 0][labels == 0], background[:, 0][labels == 0])
    with pytest.raises(ValueError, match="out_shape"):
        make_fused_batch(background, foreground, FusionConfig(), gen(3), out_shape=(8, 16, 16))
    with pytest.raises(ValueError, match="one shape"):
        make_fused_batch(background, foreground[:, :, :8], FusionConfig(), gen(3))


def test_boxes_with_views_fuse_augmented_views_of_larger_crops():
    background = torch.rand(2, 1, 24, 48, 48) * 2 - 1
    foreground = torch.rand(2, 1, 24, 48, 48) * 2 - 1
    crop = (16, 32, 32)
    cfg = dataclasses.replace(FusionConfig(), views=True, num_boxes=(4, 8), box_size_min=(4, 6, 6),
                              box_size_max=(8, 16, 16))
    assert source_shape(crop, cfg) == (24, 48, 48)
    fused, labels = make_fused_batch(background, foreground, cfg, gen(5), out_shape=crop)
    views = fusion_pair(background, foreground, cfg, gen(5), out_shape=crop)
    assert fused.shape == (2, 1, *crop) and views[0].shape == (2, 1, *crop)
    # the background level is the background's view, not the crop: the views were resized and recontrasted
    assert torch.equal(fused[:, 0][labels == 0], views[0][:, 0][labels == 0])
    assert not torch.equal(views[0], background[:, :, :16, :32, :32])


def test_no_boxes_leave_the_background():
    cfg = dataclasses.replace(FusionConfig(), num_boxes=(0, 0))
    labels = sample_labels((2, *CROP), cfg, gen(), CPU)
    assert not bool(labels.any())
