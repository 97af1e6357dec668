"""Volume Fusion: fused input volumes and their class maps, batched on any device.

A class map ``y`` with values in ``{0..K}`` says, voxel by voxel, how much of a foreground crop ``F``
is mixed into a background crop ``B``::

    alpha = y / K,    X = alpha * F + (1 - alpha) * B

and the network learns to predict ``y`` from ``X`` (MIS-FM, Wang et al. 2023). Two ways to draw ``y``:

* ``boxes`` (the paper): start from 0 and paint ``M ~ U{num_boxes}`` axis-aligned boxes one after the
  other, later boxes over earlier ones. Each box has a class ``~ U{1..K}``, a centre uniform over the
  crop's voxels and side lengths uniform in ``[box_size_min, box_size_max]``; it is clipped to the crop.
* ``grid`` (PyMIC 2024): one random block size and offset per sample cut the crop into a regular grid;
  ``round(ratio x blocks)`` blocks chosen at random get a class ``~ U{1..K}``, the other blocks and the
  margins outside the grid stay 0. Its inputs are two augmented views of one case
  (:func:`volumefusion.augment.fusion_views`).

The per-box and per-block numbers are few; they are drawn on the CPU from a ``torch.Generator`` and
only the rasterisation runs on the device, so one seed gives the same class maps on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from volumefusion import VolumeFusionError
from volumefusion.augment import SCALE_RANGE, fusion_views, uniform_int
from volumefusion.config import FusionConfig

__all__ = [
    "BoxParams", "FusionConfig", "GridParams", "blend", "draw_boxes", "draw_grid", "fuse",
    "fusion_pair", "make_fused_batch", "sample_labels", "source_shape",
]

# Box rasterisation on accelerators keeps one bit per box in a float32-exact integer (< 2**24).
_BITS_PER_PASS = 24


@dataclass(frozen=True)
class BoxParams:
    """The boxes of a batch, padded to ``M = num_boxes[1]`` per sample; int64 CPU tensors, axes (z, y, x).

    ``count`` (N,): boxes painted per sample, in order ``0..count-1``. ``size`` (N, M, 3): drawn side
    lengths in voxels, before clipping. ``start``/``stop`` (N, M, 3): the half-open extent clipped to
    the crop. ``classes`` (N, M): class in ``1..K``. Padding boxes (index >= count) have class 0 and
    ``size``, ``start`` and ``stop`` 0.
    """

    count: torch.Tensor
    size: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    classes: torch.Tensor


@dataclass(frozen=True)
class GridParams:
    """The block grids of a batch; int64 CPU tensors, axes (z, y, x), voxels.

    ``block`` (N, 3): block side. ``offset`` (N, 3): start of the first block, in ``[0, size % block]``.
    ``blocks`` (N, 3): blocks per axis, ``size // block``. ``classes`` (N, A+1, B+1, C+1): class of
    block ``(a, b, c)`` (0 = background); entries beyond a sample's own grid are 0, and the extra last
    index on each axis stands for the voxels outside the grid.
    """

    block: torch.Tensor
    offset: torch.Tensor
    blocks: torch.Tensor
    classes: torch.Tensor


def _voxels(value: float, length: int) -> int:
    """A configured box side: a fraction of ``length`` if ``value <= 1``, else voxels."""
    return max(1, round(value * length)) if value <= 1 else round(value)


def draw_boxes(n: int, crop_shape: tuple[int, int, int], config: FusionConfig,
               generator: torch.Generator) -> BoxParams:
    """Draw the boxes of ``n`` class maps of ``crop_shape`` (z, y, x) voxels (see :class:`BoxParams`).

    The amount of randomness consumed depends only on ``n``, ``crop_shape`` and ``config``.
    """
    lengths = torch.tensor(crop_shape)
    low = torch.tensor([_voxels(v, s) for v, s in zip(config.box_size_min, crop_shape)])
    high = torch.tensor([_voxels(v, s) for v, s in zip(config.box_size_max, crop_shape)])
    if (low > high).any():
        raise VolumeFusionError(
            f"fusion.box_size_min {list(config.box_size_min)} is larger than fusion.box_size_max "
            f"{list(config.box_size_max)} for a {list(crop_shape)} crop; fractions (<= 1) scale with it")
    most = config.num_boxes[1]
    count = uniform_int(config.num_boxes[0], most, (n,), generator)
    size = uniform_int(low, high, (n, most, 3), generator)
    centre = uniform_int(0, lengths - 1, (n, most, 3), generator)
    classes = uniform_int(1, config.num_classes - 1, (n, most), generator)
    start = (centre - size // 2).clamp(min=0)
    stop = torch.minimum(centre - size // 2 + size, lengths)
    used = torch.arange(most) < count[:, None]
    keep = used[..., None]
    return BoxParams(count, size * keep, start * keep, stop * keep, classes * used)


def draw_grid(n: int, crop_shape: tuple[int, int, int], config: FusionConfig,
              generator: torch.Generator) -> GridParams:
    """Draw the block grids of ``n`` class maps of ``crop_shape`` (z, y, x) voxels (see :class:`GridParams`).

    Block sides are drawn in ``[grid_block_min, grid_block_max]``, both capped at the crop, so every
    axis has at least one block.
    """
    lengths = torch.tensor(crop_shape)
    high = torch.minimum(torch.tensor(config.grid_block_max), lengths)
    low = torch.minimum(torch.tensor(config.grid_block_min), high)
    block = uniform_int(low, high, (n, 3), generator)
    offset = uniform_int(0, lengths % block, (n, 3), generator)
    blocks = lengths // block
    most = (lengths // low).tolist()  # largest grid, for fixed-size draws
    capacity = math.prod(most)
    keys = torch.rand((n, capacity), generator=generator, dtype=torch.float64)
    block_class = uniform_int(1, config.num_classes - 1, (n, capacity), generator)

    # Block j of sample i (numbered in its own grid) is foreground if its key is among the lowest
    # round(ratio * blocks) keys: a uniform choice without replacement.
    total = blocks.prod(1)
    foreground = torch.floor(config.grid_foreground_ratio * total + 0.5).long()
    keys[torch.arange(capacity) >= total[:, None]] = 2.0
    threshold = keys.sort(1).values.gather(1, (foreground[:, None] - 1).clamp(min=0))
    chosen = (keys <= threshold) & (foreground[:, None] > 0)
    block_class = torch.where(chosen, block_class, 0)

    a, b, c = torch.meshgrid(*(torch.arange(m + 1) for m in most), indexing="ij")
    nd, nh, nw = (blocks[:, i, None, None, None] for i in range(3))
    inside = (a < nd) & (b < nh) & (c < nw)
    flat = ((a * nh + b) * nw + c).where(inside, 0).view(n, -1)
    table = block_class.gather(1, flat).view(inside.shape).where(inside, 0)
    return GridParams(block, offset, blocks, table)


def _paint_boxes(params: BoxParams, shape: tuple[int, int, int]) -> torch.Tensor:
    """Class maps on the CPU: paint each box's slice in order (cost ~ the painted volume)."""
    n = params.count.shape[0]
    labels = torch.zeros((n, *shape), dtype=torch.long)
    start, stop, classes = params.start.tolist(), params.stop.tolist(), params.classes.tolist()
    for i, count in enumerate(params.count.tolist()):
        for m in range(count):
            (z0, y0, x0), (z1, y1, x1) = start[i][m], stop[i][m]
            labels[i, z0:z1, y0:y1, x0:x1] = classes[i][m]
    return labels


def _select_boxes(params: BoxParams, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Class maps without a loop over voxels or boxes: the label of a voxel is the class of the last box
    covering it. Per axis, a bit mask of the boxes covering each coordinate; the AND of the three masks
    is the set of boxes covering a voxel and its highest bit (``frexp`` exponent) the last of them.
    Boxes go in passes of 24 so the mask is exact in float32; later passes overwrite earlier ones."""
    n, most = params.classes.shape
    # One host-to-device copy: start (3), stop (3) and class of every box.
    boxes = torch.cat([params.start, params.stop, params.classes[..., None]], 2).to(device, torch.int32)
    top = torch.zeros((n, *shape), dtype=torch.int32, device=device)  # 1 + index of the top box; 0: none
    for first in range(0, most, _BITS_PER_PASS):
        group = boxes[:, first:first + _BITS_PER_PASS]
        bit = 1 << torch.arange(group.shape[1], dtype=torch.int32, device=device)
        masks = []
        for axis, length in enumerate(shape):
            at = torch.arange(length, dtype=torch.int32, device=device)
            covers = (at >= group[:, :, axis, None]) & (at < group[:, :, 3 + axis, None])
            masks.append((covers * bit[:, None]).sum(1, dtype=torch.int32))
        mask_z, mask_y, mask_x = masks
        covering = (mask_z[:, :, None] & mask_y[:, None, :])[..., None] & mask_x[:, None, None, :]
        highest = torch.frexp(covering.float()).exponent  # 0: no box of this pass, m + 1: box first + m
        top = torch.where(highest > 0, highest + first, top) if first else highest
    table = torch.cat([boxes.new_zeros(n, 1), boxes[:, :, 6]], 1).long()
    return table.gather(1, top.view(n, -1).long()).view(n, *shape)


def _rasterise_grid(params: GridParams, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Class maps of block grids, separably: expand the block table along x, then rows along y, then
    planes along z (two small gathers and one row/plane copy of the output)."""
    table = params.classes.to(device)
    geometry = torch.stack([params.offset, params.block, params.blocks], 1).to(device)  # (N, 3, axes)
    n, a1, b1, _ = table.shape
    index = []
    for axis, length in enumerate(shape):
        at = torch.arange(length, device=device)
        offset, block, blocks = (geometry[:, k, axis, None] for k in range(3))
        which = torch.div(at - offset, block, rounding_mode="floor")
        outside = (at < offset) | (which >= blocks)
        index.append(which.masked_fill(outside, table.shape[1 + axis] - 1))
    iz, iy, ix = index
    d, h, w = shape
    samples = torch.arange(n, device=device)
    rows = table.gather(3, ix[:, None, None, :].expand(n, a1, b1, w)).reshape(-1, w)
    row_index = (samples[:, None, None] * a1 + torch.arange(a1, device=device)[:, None]) * b1 + iy[:, None]
    planes = rows.index_select(0, row_index.view(-1)).view(-1, h * w)
    return planes.index_select(0, (samples[:, None] * a1 + iz).view(-1)).view(n, d, h, w)


def sample_labels(shape: tuple[int, int, int, int], config: FusionConfig, generator: torch.Generator,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Random class maps: int64 ``(N, D, H, W)`` with values in ``{0..K}`` on ``device`` (default CPU).

    ``shape`` is ``(N, D, H, W)``; ``generator`` is a CPU generator. Identical on every device for the
    same generator state.
    """
    n, *crop = shape
    crop = tuple(crop)
    device = torch.device(device or "cpu")
    if config.mode == "grid":
        return _rasterise_grid(draw_grid(n, crop, config, generator), crop, device)
    boxes = draw_boxes(n, crop, config, generator)
    # On a CPU painting slices costs about one pass over the crop, far below the bit masks; on an
    # accelerator the loop would be one kernel launch per box.
    if device.type == "cpu":
        return _paint_boxes(boxes, crop)
    return _select_boxes(boxes, crop, device)


def blend(background: torch.Tensor, foreground: torch.Tensor, labels: torch.Tensor,
          num_classes: int) -> torch.Tensor:
    """``alpha * foreground + (1 - alpha) * background`` with ``alpha = labels / (num_classes - 1)``.

    ``background``/``foreground``: float ``(N, C, D, H, W)``; ``labels``: integer ``(N, D, H, W)``,
    broadcast over channels. ``alpha = 0`` gives exactly the background, ``alpha = 1`` exactly the
    foreground (``torch.lerp``). Returns a new tensor.
    """
    alpha = labels.unsqueeze(1).to(background.dtype).div_(num_classes - 1)
    if alpha.shape == background.shape:  # one channel: the alpha buffer takes the result
        return torch.lerp(background, foreground, alpha, out=alpha)
    return torch.lerp(background, foreground, alpha)


def fuse(background: torch.Tensor, foreground: torch.Tensor, config: FusionConfig,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse with a fresh class map: returns ``(fused, labels)``.

    ``background``, ``foreground``: float ``(N, C, D, H, W)`` on any device (same shape). ``fused`` has
    their shape and dtype; ``labels`` is int64 ``(N, D, H, W)`` in ``{0..K}`` on the same device.
    """
    if background.shape != foreground.shape or background.dim() != 5:
        raise ValueError(f"fuse needs two (N, C, D, H, W) tensors of one shape, got "
                         f"{tuple(background.shape)} and {tuple(foreground.shape)}")
    n, _, *crop = background.shape
    labels = sample_labels((n, *crop), config, generator, background.device)
    return blend(background, foreground, labels, config.num_classes), labels


def uses_views(config: FusionConfig) -> bool:
    """Whether the fused volumes are augmented views of the crops (grid mode, or boxes with ``views``)."""
    return config.mode == "grid" or config.views


def source_shape(crop_size: tuple[int, int, int], config: FusionConfig) -> tuple[int, int, int]:
    """Crop size (z, y, x) the data loader should read for one fused crop of ``crop_size``.

    Boxes: the crop itself. With views (grid mode, or boxes with ``views``): ``ceil(1.5 x crop_size)``,
    so that every random resized crop (window side up to 1.5 x the output side) fits in it; pass
    ``out_shape=crop_size`` to :func:`make_fused_batch`.
    """
    if uses_views(config):
        return tuple(math.ceil(SCALE_RANGE[1] * s) for s in crop_size)
    return tuple(crop_size)


def fusion_pair(background: torch.Tensor, foreground: torch.Tensor, config: FusionConfig,
                generator: torch.Generator, *, out_shape: tuple[int, int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two volumes that are fused: the crops themselves (boxes) or their augmented views (grid, or
    boxes with ``views``: :func:`volumefusion.augment.fusion_views`). Inputs and ``out_shape`` as in
    :func:`make_fused_batch`."""
    if background.shape != foreground.shape or background.dim() != 5:
        raise ValueError(f"Volume Fusion needs two (N, 1, D, H, W) crops of one shape, got "
                         f"{tuple(background.shape)} and {tuple(foreground.shape)}")
    if uses_views(config):
        return fusion_views(background, foreground, generator, out_shape)
    if out_shape is not None and tuple(out_shape) != tuple(background.shape[2:]):
        raise ValueError(f"boxes mode fuses crops as they are: out_shape {tuple(out_shape)} differs "
                         f"from the crops' {tuple(background.shape[2:])}")
    return background, foreground


def make_fused_batch(background: torch.Tensor, foreground: torch.Tensor, config: FusionConfig,
                     generator: torch.Generator, *, out_shape: tuple[int, int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining input: fused float ``(N, 1, D, H, W)`` and labels int64 ``(N, D, H, W)``.

    What the loader supplies, per sample ``i``: HU crops normalised to [-1, 1], float ``(N, 1, ...)`` on
    the training device (the outputs stay there); ``generator`` is a CPU generator.

    * ``mode="boxes"``: ``background[i]`` and ``foreground[i]`` of the crop size, from two *different*
      cases whenever the data has more than one. They are fused as they are; ``out_shape`` must be
      None or their shape. With ``config.views`` each first becomes a view as in grid mode (below),
      of :func:`source_shape`, and ``out_shape`` is the crop size.
    * ``mode="grid"``: ``background[i]`` and ``foreground[i]`` are two independent random crops of the
      *same* case, of :func:`source_shape` (``ceil(1.5 x crop_size)``), and ``out_shape`` is the crop
      size. Each becomes a view (random resized crop, flips, percentile contrast, gamma, joint
      inversion; values in [-1, 1]) and the two views are fused on a block grid. With
      ``out_shape=None`` the output has the input's shape and windows larger than the input are
      clipped to it (the reference's behaviour for equal sizes).

    Random draws, in order: the views (grid mode), then the class map.
    """
    background, foreground = fusion_pair(background, foreground, config, generator, out_shape=out_shape)
    return fuse(background, foreground, config, generator)
