"""PNG pictures: image/label montages, training curves and box plots (matplotlib, Agg canvas).

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas, never pyplot, so no
global backend or window state is touched; every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from volumefusion.files import atomic_path

# Fixed class colours (RGB in [0, 1]): class i always has colour i, in every picture.
LABEL_COLORS = np.array([
    (0.0, 0.0, 0.0), (0.902, 0.098, 0.294), (0.235, 0.706, 0.294), (1.0, 0.882, 0.098),
    (0.0, 0.510, 0.784), (0.961, 0.510, 0.188), (0.569, 0.118, 0.706), (0.275, 0.941, 0.941),
    (0.941, 0.196, 0.902), (0.824, 0.961, 0.235), (0.980, 0.745, 0.831), (0.0, 0.502, 0.502),
    (0.863, 0.745, 1.0), (0.667, 0.431, 0.157), (1.0, 0.980, 0.784), (0.502, 0.0, 0.0),
])


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


def _numpy(array) -> np.ndarray:
    """Tensors (any device) and arrays as numpy."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu() if array.is_floating_point() else array.detach().cpu()
    return np.asarray(array)


def label_colors(label2d: np.ndarray) -> np.ndarray:
    """``(H, W)`` integer classes -> ``(H, W, 3)`` float RGB with :data:`LABEL_COLORS` (cycled past 16)."""
    return LABEL_COLORS[np.asarray(label2d, dtype=np.int64) % len(LABEL_COLORS)]


def _window(images: Sequence[np.ndarray]) -> tuple[float, float]:
    """Display range shared by a row: the 0.5 and 99.5 percentiles of its images."""
    values = np.concatenate([np.ravel(i) for i in images]).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return (float(low), float(high)) if high > low else (float(low), float(low) + 1.0)


def label_overlay(image2d, label2d, alpha: float = 0.4,
                  window: tuple[float, float] | None = None) -> np.ndarray:
    """Grey image with coloured classes on top: ``(H, W, 3)`` float RGB in [0, 1].

    ``image2d``: intensities shown through ``window`` (default: its 0.5-99.5 percentiles);
    ``label2d``: integer classes, 0 left uncoloured; ``alpha``: opacity of the colours.
    """
    image, label = _numpy(image2d), _numpy(label2d)
    low, high = window or _window([image])
    grey = np.clip((image - low) / (high - low), 0, 1)[..., None].repeat(3, -1)
    mask = (label > 0)[..., None]
    return np.where(mask, (1 - alpha) * grey + alpha * label_colors(label), grey)


def middle_slices(volume, axis: int = 0, count: int = 1, focus=None) -> list[np.ndarray]:
    """``count`` evenly spaced 2D slices across ``axis`` of a 3D volume (one: the middle one).

    With ``focus`` (a volume of the same shape, e.g. a label map), the slices are spread around the
    centre of its nonzero voxels instead, so that small structures appear.
    """
    volume = _numpy(volume)
    length = volume.shape[axis]
    centre = (length - 1) / 2
    if focus is not None:
        where = np.nonzero(np.moveaxis(_numpy(focus), axis, 0).reshape(length, -1).any(1))[0]
        if where.size:
            centre = (where[0] + where[-1]) / 2
    spread = length / (count + 1)
    positions = [centre + (i - (count - 1) / 2) * spread for i in range(count)]
    return [np.take(volume, int(np.clip(round(p), 0, length - 1)), axis=axis) for p in positions]


def save_montage(path: str | Path, rows: Sequence[tuple], *, col_titles: Sequence[str] | None = None,
                 window: tuple[float, float] | None = None, title: str | None = None,
                 label_names: Sequence[str] | None = None, cell: float = 2.2, dpi: int = 100) -> Path:
    """A grid of 2D pictures, one row per ``(row_title, images[, kind])``.

    ``kind`` is ``"image"`` (default; grey, through ``window`` or the row's 0.5-99.5 percentiles; RGB
    ``(H, W, 3)`` arrays such as :func:`label_overlay` results are shown as they are) or ``"label"``
    (integer classes in :data:`LABEL_COLORS`, 0 black). Images are 2D arrays or tensors;
    rows may have different lengths. ``label_names[i]`` adds a legend entry for class ``i``; ``cell``
    is the width of one picture in inches. Returns ``path``.
    """
    columns = max((len(r[1]) for r in rows), default=1)
    shapes = [np.shape(i) for r in rows for i in r[1]]
    aspect = max((s[0] / s[1] for s in shapes if len(s) >= 2 and s[1]), default=1.0)
    extra = (0.4 if title else 0) + (0.5 if label_names else 0)
    figure = _figure(cell * columns + 0.6, cell * aspect * len(rows) + 0.3 + extra)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, (row_title, images, *kind) in enumerate(rows):
        images = [_numpy(i) for i in images]
        is_label = (kind[0] if kind else "image") == "label"
        low, high = window or (_window(images) if images and not is_label else (0.0, 1.0))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
            if c >= len(images):
                continue
            if is_label:
                ax.imshow(label_colors(images[c]), interpolation="nearest")
            else:
                ax.imshow(images[c], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(row_title)
            if r == 0 and col_titles is not None and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize="medium")
    if label_names:
        from matplotlib.patches import Patch

        handles = [Patch(color=label_colors(i), label=name) for i, name in enumerate(label_names)]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
                      fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path, dpi)


def save_curves(path: str | Path, panels: dict[str, dict[str, Iterable[tuple[float, float]]]], *,
                xlabel: str = "step", log_y: Iterable[str] = ("learning rate",), title: str | None = None,
                dpi: int = 100) -> Path:
    """Line plots, one panel per ``{panel_title: {series_name: [(x, y), ...]}}`` entry, side by side
    (two rows beyond three panels). Panels named in ``log_y`` use a log y axis. Returns ``path``."""
    panels = {t: {k: list(v) for k, v in group.items()} for t, group in panels.items()}
    count = max(1, len(panels))
    columns = count if count <= 3 else (count + 1) // 2
    rows = (count + columns - 1) // columns
    figure = _figure(4.2 * columns, 3.2 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    log_y = set(log_y)
    for ax, (panel, group) in zip(axes, panels.items()):
        for name, points in group.items():
            if points:
                x, y = zip(*points)
                ax.plot(x, y, label=name, linewidth=1.2, marker="." if len(points) < 30 else None)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if panel in log_y:
            ax.set_yscale("log")
        if len(group) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    return _save(figure, path, dpi)


def save_band_curves(path: str | Path, panels: dict[str, dict[str, tuple[Sequence[float], np.ndarray]]], *,
                     xlabel: str = "step", ylabel: str | None = None, title: str | None = None,
                     dpi: int = 100) -> Path:
    """Mean curves with their spread, one panel per ``{panel_title: {series_name: (x, ys)}}`` entry.

    ``x``: (T,) positions; ``ys``: (R, T) one row per repetition (e.g. per seed). Each series is drawn
    as its mean over the rows with the band between the smallest and largest row. Returns ``path``.
    """
    figure = _figure(4.2 * max(1, len(panels)), 3.4)
    axes = figure.subplots(1, max(1, len(panels)), squeeze=False).ravel()
    for ax, (panel, group) in zip(axes, panels.items()):
        for name, (x, ys) in group.items():
            ys = np.asarray(ys, dtype=np.float64).reshape(-1, len(x))
            line, = ax.plot(x, ys.mean(0), label=f"{name} (mean of {len(ys)})", linewidth=1.5)
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path, dpi)


def save_boxplot(path: str | Path, data: dict[str, Sequence[float]], title: str | None = None, *,
                 ylabel: str | None = None, dpi: int = 100) -> Path:
    """One box (median, quartiles, 1.5 IQR whiskers) and the individual points per ``{name: values}``;
    NaN values are left out. Returns ``path``."""
    names = list(data)
    values = [np.asarray([v for v in data[n] if v == v], dtype=np.float64) for n in names]
    figure = _figure(max(3.0, 0.9 * len(names) + 1.5), 3.6)
    ax = figure.subplots()
    ax.boxplot(values, tick_labels=names, showfliers=False)
    jitter = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
    for i, v in enumerate(values, start=1):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, v.size), v, s=8, alpha=0.6, color="tab:blue")
    if len(names) > 4:
        ax.tick_params(axis="x", labelrotation=45)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path, dpi)
