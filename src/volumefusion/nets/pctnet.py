"""PCT-Net: a 3D U-shaped network of parallel convolution + shifted-window transformer blocks (MIS-FM).

Layout (``resolution_mode`` 1 shown; features ``f0..f4``, input (N, C_in, D, H, W)):

    stem:     proj conv -> conv0 ............................. x0  (f0, full resolution)
              down1 (in-plane) -> conv1 ....................... x1  (f1, 1/2)
              down2 ........................................... x2  (f2, 1/4)
    pyramid:  e2 = PCT(x2) -> down3 -> e3 -> down4 -> e4         (f2, f3, f4 at 1/4, 1/8, 1/16)
              d3 = PCT(up4(e3, e4)); d2 = PCT(up3(e2, d3))      (f3 at 1/8, f2 at 1/4)
    head:     up2(x1, d2) -> conv1 -> up1(x0, .) -> conv0 -> 1x1 conv -> logits (full resolution)

A PCT block is ``ConvBlock(x) + SwinLayer(x)``. Every convolution is pre-activation
(BatchNorm -> PReLU -> Conv; the convolutional blocks are :mod:`volumefusion.nets.blocks`).
``resolution_mode`` m makes the first m stem down-samplings (and their mirror images in the head)
in-plane only, with (1, 3, 3) convolutions at those levels.

This is our own implementation of the computation in openmedlab/MIS-FM ``net/pct_net.py`` and
``net/transformer.py``; :mod:`volumefusion.weights` maps that code's checkpoint keys onto ours.
Deviations that do not change results: window padding, shift masks and attention masks are derived
from the feature shape at run time (the reference fixes the input size at construction), attention
runs through :func:`torch.nn.functional.scaled_dot_product_attention`, and only the stem and head of
the chosen resolution mode are built.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from volumefusion.nets.blocks import ConvBlock, DownSample, PreActConv, UpCat, kernel_and_padding
from volumefusion.pctnet_shape import pyramid_shape

REL_POS_KINDS = ("exact", "reference")
# Additive mask value between tokens of different regions of a shifted window (the reference's).
SHIFT_MASK_VALUE = -100.0


@contextlib.contextmanager
def _running_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """While active, the BatchNorm layers of ``module`` still normalise training batches by batch
    statistics but leave their running statistics as they are (momentum 0, batch count restored).

    Running with the statistics off instead would save fewer tensors than the forward pass did, which
    a checkpoint's recompute must not.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm3d) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _recompute_contexts(module: nn.Module):
    # (forward, recompute) contexts of torch.utils.checkpoint: the recompute must not count the batch
    # in the running statistics a second time.
    return contextlib.nullcontext(), _running_statistics_frozen(module)


def run_module(module: nn.Module, *args: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """``module(*args)``; with ``checkpoint``, in training with autograd on, the module keeps only
    ``args`` for the backward pass and recomputes its activations there (non-reentrant
    :func:`torch.utils.checkpoint.checkpoint`, same random numbers).

    BatchNorm running statistics are updated once per step: the eager recompute leaves them alone;
    under ``torch.compile`` AOTAutograd functionalises the update, so the recompute repeats no
    mutation (and a custom checkpoint context would not compile).
    """
    if not (checkpoint and module.training and torch.is_grad_enabled()):
        return module(*args)
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False,
                                             context_fn=functools.partial(_recompute_contexts, module))


# --------------------------------------------------------------------------------------------------
# shifted-window attention


@functools.lru_cache(maxsize=16)
def _relative_position_index(window: int, kind: str) -> torch.Tensor:
    if kind not in REL_POS_KINDS:
        raise ValueError(f"relative-position index {kind!r}: choose one of {REL_POS_KINDS}")
    axis = torch.arange(window, device="cpu")  # cached: never on a default device set by the caller
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).flatten(1)  # (3, T)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (3, T, T), each in [0, 2w-2]
    side = 2 * window - 1
    strides = (side * side, side, 1) if kind == "exact" else (3 * window - 1, side, 1)
    return torch.einsum("k,kij->ij", torch.tensor(strides, device="cpu"), offsets)


def relative_position_index(window: int, kind: str = "exact") -> torch.Tensor:
    """(T, T) int64 row of the bias table for each (query, key) pair of a window of T = window^3 tokens.

    Tokens are ordered (z, y, x) inside a window. ``exact`` gives each of the (2w-1)^3 offsets its own
    row. ``reference`` reproduces MIS-FM, whose strides (3w-1, 2w-1, 1) make offsets share rows
    (291 of 1331 rows are used for w = 6); weights trained with it must run with it.
    """
    return _relative_position_index(window, kind).clone()


def shift_mask(padded: Sequence[int], window: int, shift: int,
               device: torch.device | None = None) -> torch.Tensor:
    """(num_windows, T, T) float32 additive mask of a cyclically shifted window partition.

    ``padded``: feature shape (D, H, W), multiples of ``window``. After rolling by ``-shift``, each axis
    has three regions ([0, L-w), [L-w, L-s), [L-s, L)); tokens of a window that came from different
    regions must not attend to each other (:data:`SHIFT_MASK_VALUE`), everything else is 0. Windows are
    ordered (z, y, x) like :func:`window_partition`.
    """
    labels = []
    for length in padded:
        c = torch.arange(length, device=device)
        region = (c >= length - window).long() + (c >= length - shift).long()
        labels.append(region.view(length // window, window))
    lz, ly, lx = labels
    # token label = 9 * z region + 3 * y region + x region, laid out (nz, ny, nx, wz, wy, wx)
    label = (9 * lz[:, None, None, :, None, None] + 3 * ly[None, :, None, None, :, None]
             + lx[None, None, :, None, None, :])
    label = label.reshape(-1, window**3)
    different = label[:, :, None] != label[:, None, :]
    return torch.where(different, SHIFT_MASK_VALUE, 0.0)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, D, H, W, C) -> (N, num_windows, window^3, C); D, H, W multiples of ``window``."""
    n, d, h, w, c = x.shape
    x = x.view(n, d // window, window, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, -1, window**3, c)


def window_reverse(x: torch.Tensor, window: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (N, num_windows, window^3, C) -> (N, D, H, W, C)."""
    d, h, w = shape
    n, c = x.shape[0], x.shape[-1]
    x = x.view(n, d // window, h // window, w // window, window, window, window, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, d, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias.

    ``forward(x (N, num_windows, T, C), shift (num_windows, T, T) | None) -> (N, num_windows, T, C)``.
    The bias (and the shift mask, if any) enter
    :func:`~torch.nn.functional.scaled_dot_product_attention` as one additive mask shared by the
    batch: without a shift mask it is (1, heads, T, T) over a batch of N * num_windows windows; with
    one it is (1, num_windows * heads, T, T) over N samples, so it is never copied per sample.
    """

    def __init__(self, dim: int, num_heads: int, window: int, dropout: float = 0.0,
                 rel_pos_index: str = "exact"):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.attn_drop = dropout
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent, so a state dict carries the index its bias table was trained with.
        self.register_buffer("relative_position_index", relative_position_index(window, rel_pos_index))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def index_kind(self) -> str:
        """Which formula the current index buffer follows: ``exact``, ``reference`` or ``custom``."""
        index = self.relative_position_index
        for kind in REL_POS_KINDS:
            if torch.equal(index.cpu(), _relative_position_index(self.window, kind)):
                return kind
        return "custom"

    def bias(self) -> torch.Tensor:
        """(heads, T, T) relative-position bias, float32, contiguous (fused attention kernels need the
        mask's last dimension contiguous)."""
        t = self.window**3
        table = self.relative_position_bias_table
        return table[self.relative_position_index.view(-1)].view(t, t, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        n, nw, t, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(n, nw, t, 3, h, c // h)
        dropout = self.attn_drop if self.training else 0.0
        if shift is None:
            # windows x batch as the batch: q, k, v are strided views, no copy
            qkv = qkv.view(n * nw, t, 3, h, c // h)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            mask = self.bias().to(q.dtype).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            out = out.transpose(1, 2).reshape(n, nw, t, c)
        else:
            # windows x heads as the heads: the per-window mask broadcasts over the batch
            q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, n, nw * h, t, c // h).unbind(0)
            mask = (self.bias().unsqueeze(0) + shift.unsqueeze(1)).to(q.dtype).view(1, nw * h, t, t)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            out = out.view(n, nw, h, t, c // h).transpose(2, 3).reshape(n, nw, t, c)
        return self.proj_drop(self.proj(out))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale survivors by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout on the last dimension."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with its own residual.

    ``forward(x (N, D, H, W, C)) -> (N, D, H, W, C)`` for any D, H, W: features are zero-padded (after
    the norm) to multiples of the window, cyclically rolled by ``-shift`` when ``shift`` > 0, and
    attended window by window; padded tokens take part as keys, as in the reference.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int = 0, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, drop_path: float = 0.0, rel_pos_index: str = "exact"):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window {window})")
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, dropout, rel_pos_index)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path = DropPath(drop_path)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _shift_mask(self, padded: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """The shift mask for this padded shape, built once per (shape, device) outside torch.compile."""
        if torch.compiler.is_compiling():
            return shift_mask(padded, self.window, self.shift, device)  # traced once into the graph
        key = (padded, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = shift_mask(padded, self.window, self.shift, device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, s = self.window, self.shift
        shape = x.shape[1:4]
        pad = [(w - n % w) % w for n in shape]
        y = F.pad(self.norm1(x), (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = tuple(n + p for n, p in zip(shape, pad))
        mask = None
        if s:
            y = torch.roll(y, (-s, -s, -s), (1, 2, 3))
            mask = self._shift_mask(padded, x.device)
        y = window_reverse(self.attn(window_partition(y, w), mask), w, padded)
        if s:
            y = torch.roll(y, (s, s, s), (1, 2, 3))
        y = y[:, : shape[0], : shape[1], : shape[2]]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinLayer(nn.Module):
    """Swin blocks alternating plain and shifted windows (shift = window // 2 on odd blocks when
    ``shifted``), on (N, C, D, H, W) features; input dropout as in the reference.

    ``checkpointing`` recomputes each block's activations in the backward pass (:func:`run_module`).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, shifted: bool = True,
                 dropout: float = 0.0, drop_path: float = 0.0, rel_pos_index: str = "exact"):
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, window // 2 if shifted and i % 2 else 0, dropout=dropout,
                      drop_path=drop_path, rel_pos_index=rel_pos_index)
            for i in range(depth)
        )
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.drop(x.permute(0, 2, 3, 4, 1))  # (N, D, H, W, C): free under channels_last_3d
        for block in self.blocks:
            t = run_module(block, t, checkpoint=self.checkpointing)
        return t.permute(0, 4, 1, 2, 3)


class PCTBlock(nn.Module):
    """Parallel convolution + transformer: ``ConvBlock(x) + SwinLayer(x)``, C -> C channels."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, shifted: bool, dropout: float,
                 drop_path: float, rel_pos_index: str):
        super().__init__()
        self.conv = ConvBlock(dim, dim, dropout=dropout)
        self.swin = SwinLayer(dim, depth, num_heads, window, shifted, dropout, drop_path, rel_pos_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.swin(x)


# --------------------------------------------------------------------------------------------------
# the network


class Stem(nn.Module):
    """Input -> (x0 full, x1 1/2, x2 1/4 resolution); level i is in-plane when ``planar[i]``.

    ``checkpointing`` recomputes the activations of each block after the input projection in the
    backward pass (:func:`run_module`).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], planar: Sequence[bool],
                 dropout: Sequence[float]):
        super().__init__()
        f0, f1, f2 = channels
        kernel, padding = kernel_and_padding(planar[0])
        self.proj = nn.Conv3d(in_channels, f0, kernel, padding=padding)
        self.conv0 = ConvBlock(f0, f0, planar[0], dropout[0])
        self.down1 = DownSample(f0, f1, pool_planar=planar[0], conv_planar=planar[1])
        self.conv1 = ConvBlock(f1, f1, planar[1], dropout[1])
        self.down2 = DownSample(f1, f2, pool_planar=planar[1], conv_planar=False)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        run = functools.partial(run_module, checkpoint=self.checkpointing)
        x0 = run(self.conv0, self.proj(x))
        x1 = run(self.conv1, run(self.down1, x0))
        return x0, x1, run(self.down2, x1)


class Pyramid(nn.Module):
    """Five PCT blocks in a U at 1/4, 1/8, 1/16 resolution, plus the 1/4 and 1/8 output convolutions."""

    def __init__(self, channels: Sequence[int], dropout: Sequence[float], depths: Sequence[int],
                 num_heads: Sequence[int], windows: Sequence[int], shifted: Sequence[bool], num_classes: int,
                 drop_path: float, rel_pos_index: str):
        super().__init__()
        f2, f3, f4 = channels

        def pct(level: int, dim: int) -> PCTBlock:
            return PCTBlock(dim, depths[level], num_heads[level], windows[level], shifted[level],
                            dropout[level], drop_path, rel_pos_index)

        self.e2 = pct(0, f2)
        self.down3 = DownSample(f2, f3)
        self.e3 = pct(1, f3)
        self.down4 = DownSample(f3, f4)
        self.e4 = pct(2, f4)
        self.up4 = UpCat(f3, f4)
        self.d3 = pct(1, f3)
        self.up3 = UpCat(f2, f3)
        self.d2 = pct(0, f2)
        self.out_conv2 = PreActConv(f2, num_classes)
        self.out_conv3 = PreActConv(f3, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, f2, ...) at 1/4 -> (d2 at 1/4, d3 at 1/8)."""
        e2 = self.e2(x)
        e3 = self.e3(self.down3(e2))
        e4 = self.e4(self.down4(e3))
        d3 = self.d3(self.up4(e3, e4))
        return self.d2(self.up3(e2, d3)), d3


class Head(nn.Module):
    """(x0, x1, d2) -> decoder features at full and 1/2 resolution, and their output convolutions.

    ``checkpointing`` recomputes the activations of each block, output convolutions included, in the
    backward pass (:func:`run_module`).
    """

    def __init__(self, channels: Sequence[int], planar: Sequence[bool], dropout: Sequence[float],
                 num_classes: int):
        super().__init__()
        f0, f1, f2 = channels
        self.up2 = UpCat(f1, f2, up_planar=planar[1], conv_planar=planar[1])
        self.conv1 = ConvBlock(f1, f1, planar[1], dropout[1])
        self.up1 = UpCat(f0, f1, up_planar=planar[0], conv_planar=planar[0])
        self.conv0 = ConvBlock(f0, f0, planar[0], dropout[0])
        self.out_conv0 = PreActConv(f0, num_classes)
        self.out_conv1 = PreActConv(f1, num_classes)
        self.checkpointing = False

    def forward(self, x0: torch.Tensor, x1: torch.Tensor,
                d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        run = functools.partial(run_module, checkpoint=self.checkpointing)
        d1 = run(self.conv1, run(self.up2, x1, d2))
        return run(self.conv0, run(self.up1, x0, d1)), d1

    def logits(self, d: torch.Tensor, level: int) -> torch.Tensor:
        """Output convolution of the decoder features ``d`` at full (``level`` 0) or 1/2 (1) resolution."""
        return run_module((self.out_conv0, self.out_conv1)[level], d, checkpoint=self.checkpointing)


def reference_windows(input_size: Sequence[int], resolution_mode: int = 1,
                      window_sizes: Sequence[int] = (6, 6, 6)) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Per-level (window sizes, shifted) of a MIS-FM PCT-Net configured with ``input_size``.

    The reference fixes each level's resolution at construction and, where the smallest side is not
    larger than the window, shrinks the window to that side and turns the shift off; these are the
    ``window_size`` / ``shifted_windows`` arguments of :class:`PCTNet` that reproduce it.
    """
    scale = ((4, 4, 4), (2, 4, 4), (1, 4, 4))[resolution_mode]
    windows, shifted = [], []
    for level, window in enumerate(window_sizes):
        side = min(n // s // 2**level for n, s in zip(input_size, scale))
        windows.append(min(side, window))
        shifted.append(side > window)
    return tuple(windows), tuple(shifted)


class PCTNet(nn.Module):
    """PCT-Net for 3D segmentation; see the module docstring for the layout.

    ``forward(x (N, in_channels, D, H, W) float)`` returns logits (N, num_classes, D, H, W), or with
    ``deep_supervision`` (an attribute that may be changed at any time) the list
    ``[full, 1/2, 1/4, 1/8]``. D, H, W must be multiples of :attr:`size_divisor`.

    ``window_size`` and ``shifted_windows`` are one value (or a sequence of one) or one per pyramid level
    (1/4, 1/8, 1/16);
    :func:`reference_windows` gives the values that reproduce a MIS-FM model trained at a small input
    size. ``rel_pos_index``: ``exact`` (collision-free, for new models) or ``reference`` (MIS-FM weights).
    ``activation_checkpointing`` (an attribute too) recomputes in the backward pass of training,
    instead of keeping, the activations of the transformer blocks and of the full- and 1/2-resolution
    convolutions of the stem and head, where most of the memory of a training step sits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5,
                 feature_channels: Sequence[int] = (24, 48, 128, 256, 512),
                 dropout: Sequence[float] = (0.0, 0.0, 0.2, 0.2, 0.2), depths: Sequence[int] = (2, 2, 2),
                 num_heads: Sequence[int] = (4, 8, 16), window_size: int | Sequence[int] = 6,
                 resolution_mode: int = 1, deep_supervision: bool = True, drop_path: float = 0.2,
                 rel_pos_index: str = "exact", activation_checkpointing: bool = False,
                 shifted_windows: bool | Sequence[bool] = True):
        super().__init__()
        depths, num_heads, windows, shifted = pyramid_shape(feature_channels, depths, num_heads, window_size,
                                                            shifted_windows)
        if len(dropout) != len(feature_channels):
            raise ValueError(f"dropout {list(dropout)}: needs one value per feature level ({len(feature_channels)})")
        if resolution_mode not in (0, 1, 2):
            raise ValueError(f"resolution_mode {resolution_mode}: choose 0, 1 or 2")
        if rel_pos_index not in REL_POS_KINDS:
            raise ValueError(f"rel_pos_index {rel_pos_index!r}: choose one of {REL_POS_KINDS}")
        self.resolution_mode = resolution_mode
        self.deep_supervision = deep_supervision
        planar = (resolution_mode >= 1, resolution_mode >= 2)
        self.stem = Stem(in_channels, feature_channels[:3], planar, dropout[:3])
        self.pyramid = Pyramid(feature_channels[2:], dropout[2:], depths, num_heads, windows, shifted,
                               num_classes, drop_path, rel_pos_index)
        self.head = Head(feature_channels[:3], planar, dropout[:3], num_classes)
        self.activation_checkpointing = activation_checkpointing

        self.size_divisor: tuple[int, int, int] = (16 >> resolution_mode, 16, 16)
        self.head_prefixes: tuple[str, ...] = ("head.out_conv0.conv.", "head.out_conv1.conv.",
                                               "pyramid.out_conv2.conv.", "pyramid.out_conv3.conv.")
        self.encoder_prefixes: tuple[str, ...] = ("stem.", "pyramid.e2.", "pyramid.down3.", "pyramid.e3.",
                                                  "pyramid.down4.", "pyramid.e4.")

    def _checkpointed(self) -> list[nn.Module]:
        return [self.stem, self.head] + [m for m in self.modules() if isinstance(m, SwinLayer)]

    @property
    def activation_checkpointing(self) -> bool:
        return all(m.checkpointing for m in self._checkpointed())

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        for m in self._checkpointed():
            m.checkpointing = bool(value)

    @property
    def rel_pos_index(self) -> str:
        """The relative-position index the (possibly loaded) weights run with; ``mixed`` if levels differ."""
        kinds = {m.index_kind() for m in self.modules() if isinstance(m, WindowAttention)}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        bad = [n for n, d in zip(x.shape[2:], self.size_divisor) if n % d]
        if x.dim() != 5 or bad:
            raise ValueError(f"PCTNet input {tuple(x.shape)}: expected (N, C, D, H, W) with D, H, W "
                             f"multiples of {self.size_divisor}")
        x0, x1, x2 = self.stem(x)
        d2, d3 = self.pyramid(x2)
        d0, d1 = self.head(x0, x1, d2)
        out = self.head.logits(d0, 0)
        if not self.deep_supervision:
            return out
        return [out, self.head.logits(d1, 1), self.pyramid.out_conv2(d2), self.pyramid.out_conv3(d3)]
