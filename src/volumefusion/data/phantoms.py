"""Procedural CT phantoms: random torso volumes with realistic HU and an organ label map.

A phantom is a contrast-enhanced (portal-venous-like) CT of the lower thorax and upper abdomen:
lungs and heart in the superior slices, liver, spleen, stomach and kidneys in the inferior ones, the
spine, ribs and aorta throughout. Every organ is a smoothly deformed superquadric whose size,
position, orientation and HU are drawn from the seed, so a crop's anatomy depends on where it is
taken. Liver and spleen have overlapping HU and unlabelled structures (ribs, stomach, bowel, vena
cava, muscles) share HU with labelled ones, so a segmentation must use shape and context rather
than a threshold.

Conventions: arrays are ``(z, y, x)``; with an identity direction in ITK's LPS world frame the index
axes point to the patient's left (x), posterior (y) and superior (z). The anatomy is scaled to fill
the field of view, so any ``shape`` / ``spacing_zyx`` gives a whole torso cross-section.

Cost: a ``[64, 160, 160]`` phantom takes about 0.2 s of CPU time. Every shape is evaluated only
inside its bounding box, and smooth random fields are separable Gaussian-kernel interpolations of a
coarse normal grid (three small matrix products), never full-volume filters. The only full-volume
filter is the final point-spread blur.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from volumefusion import VolumeFusionError
from volumefusion.files import atomic_write_text
from volumefusion.geometry import Geometry
from volumefusion.io import write_image

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "lung_right",
    2: "lung_left",
    3: "heart",
    4: "aorta",
    5: "liver",
    6: "spleen",
    7: "kidney_right",
    8: "kidney_left",
    9: "spine",
}
"""Label value -> organ name of :attr:`Phantom.label` (right/left are the patient's)."""

_LABEL = {name: value for value, name in LABEL_NAMES.items()}


@dataclass(frozen=True)
class Phantom:
    """One generated CT volume.

    Attributes:
        image: ``(z, y, x)`` int16, Hounsfield units.
        label: ``(z, y, x)`` uint8, values in :data:`LABEL_NAMES`.
        spacing_zyx: voxel size in mm, ``(z, y, x)``.
        scan: how this scan varies (:meth:`_Scan.describe`): patient size and pose, field of view,
            contrast phase, missing organs, lesions, noise and blur.
    """

    image: np.ndarray
    label: np.ndarray
    spacing_zyx: tuple[float, float, float]
    scan: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Geometry helpers


class _Field:
    """A smooth random scalar field with unit variance at every point.

    Values on a coarse grid of nodes spanning ``[-1.3, 1.3]`` on each axis are interpolated with
    Gaussian kernels one node spacing wide; the kernels are normalised per axis so that each point is
    a unit-norm combination of independent normals, i.e. exactly N(0, 1).
    """

    _SPAN = 1.3

    def __init__(self, rng: np.random.Generator, nodes: tuple[int, int, int]):
        self.values = rng.standard_normal(nodes).astype(np.float32)

    @classmethod
    def _weights(cls, coords: np.ndarray, n: int) -> np.ndarray:
        nodes = np.linspace(-cls._SPAN, cls._SPAN, n, dtype=np.float32)
        h = nodes[1] - nodes[0]
        c = np.clip(coords, -cls._SPAN, cls._SPAN)[:, None]
        w = np.exp(-0.5 * ((c - nodes[None, :]) / h) ** 2)
        return w / np.linalg.norm(w, axis=1, keepdims=True)

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Evaluate on the grid spanned by 1D normalised coordinates; returns ``(len(z), len(y), len(x))``."""
        nz, ny, nx = self.values.shape
        wz, wy, wx = self._weights(z, nz), self._weights(y, ny), self._weights(x, nx)
        t = self.values @ wx.T  # (nz, ny, X)
        t = wy @ t  # (nz, Y, X)
        return (wz @ t.reshape(nz, -1)).reshape(len(z), len(y), len(x))

    def along_z(self, z: np.ndarray) -> np.ndarray:
        """The field on the line x = y = 0: a smooth random 1D path, shape ``(len(z),)``."""
        zero = np.zeros(1, np.float32)
        return self(z, zero, zero)[:, 0, 0]


class _Canvas:
    """The volume being painted, with normalised coordinates.

    In-plane coordinates are in units of half the smaller in-plane extent (so circles stay round in
    mm), z in units of half the z extent; all are 0 at the centre of the field of view. A scan that
    sees the patient smaller, off-centre or shifted along z scales and shifts these coordinates.
    """

    def __init__(self, shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], scan: _Scan,
                 grain: _Field | None = None):
        self.scan = scan
        self.grain = grain  # textured organs (make_phantom's ``texture``): the liver's fine texture
        extent = [n * s for n, s in zip(shape, spacing_zyx)]
        half_inplane = min(extent[1], extent[2]) / 2
        scales = (extent[0] / 2, half_inplane, half_inplane)
        # patient coordinate of each voxel: field-of-view coordinate x scale + shift (see _Scan)
        self.z, self.y, self.x = (
            ((((np.arange(n) + 0.5) * s - e / 2) / r) * k + t).astype(np.float32)
            for n, s, e, r, k, t in zip(shape, spacing_zyx, extent, scales, scan.scale_zyx, scan.shift_zyx)
        )
        self.image = np.full(shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in ``[lo, hi]`` (z, y, x); None if empty."""
        out = []
        for c, a, b in zip((self.z, self.y, self.x), lo, hi):
            i0, i1 = np.searchsorted(c, a), np.searchsorted(c, b, side="right")
            if i1 <= i0:
                return None
            out.append(slice(int(i0), int(i1)))
        return tuple(out)

    def coords(self, sl):
        """Broadcastable ``(z, y, x)`` coordinate arrays of a box."""
        return self.z[sl[0], None, None], self.y[None, sl[1], None], self.x[None, None, sl[2]]

    def paint(self, sl, mask: np.ndarray, hu, label: int | None = None) -> None:
        """Set HU (scalar or array broadcastable to the box) and, if given, the label where ``mask``."""
        region = self.image[sl]
        region[mask] = np.broadcast_to(hu, region.shape)[mask] if isinstance(hu, np.ndarray) else hu
        if label is not None:
            self.label[sl][mask] = label


@dataclass
class _Blob:
    """A superquadric ``sum |local_i / axis_i|^p < 1 + wobble * field`` rotated about z by ``angle``.

    ``centre`` and ``axes`` are normalised ``(z, y, x)``.
    """

    centre: np.ndarray
    axes: np.ndarray
    angle: float
    power: float
    wobble: float
    field: _Field

    @classmethod
    def draw(cls, rng, centre, axes, *, angle=0.0, power=2.0, wobble=0.15, nodes=(4, 5, 5)) -> _Blob:
        return cls(np.asarray(centre, np.float32), np.asarray(axes, np.float32), angle, power, wobble,
                   _Field(rng, nodes))

    def mask(self, canvas: _Canvas, within: tuple | None = None):
        """Return ``(slices, mask)`` of the shape restricted to its bounding box, or ``(None, None)``.

        ``within``, if given, is another ``(slices, mask)`` the shape is intersected with.
        """
        # the field is N(0, 1): |field| < 2.5 holds almost everywhere, so the shape stays in the box
        grow = (1 + 2.5 * self.wobble) ** (1 / self.power)
        half = np.array([self.axes[0], self.axes[1:].max(), self.axes[1:].max()]) * grow
        sl = canvas.box(self.centre - half, self.centre + half)
        if sl is None:
            return None, None
        offsets = [c_[s_] - m for c_, s_, m in zip((canvas.z, canvas.y, canvas.x), sl, self.centre)]
        dz, dy, dx = offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = (c * dx + s * dy) / self.axes[2], (c * dy - s * dx) / self.axes[1]
        p = self.power
        f = np.abs(dz / self.axes[0]) ** p + np.abs(u) ** p + np.abs(v) ** p
        # the deformation is drawn in the shape's own units, so every organ gets a few bumps
        inside = f < 1 + self.wobble * self.field(*(o / a for o, a in zip(offsets, self.axes)))
        if within is not None:
            inside &= _restrict(within, sl, inside.shape)
        return sl, inside


def _restrict(region, sl, shape) -> np.ndarray:
    """The boolean mask ``region = (slices, mask)`` cut to the box ``sl`` (False outside region)."""
    rsl, rmask = region
    out = np.zeros(shape, dtype=bool)
    if rsl is None:
        return out
    src, dst = [], []
    for a, b in zip(rsl, sl):
        lo, hi = max(a.start, b.start), min(a.stop, b.stop)
        if hi <= lo:
            return out
        src.append(slice(lo - a.start, hi - a.start))
        dst.append(slice(lo - b.start, hi - b.start))
    out[tuple(dst)] = rmask[tuple(src)]
    return out


def _tube(canvas: _Canvas, path_field: tuple[_Field, _Field], centre_yx, radius, z_range, wiggle):
    """A vertical vessel: a disc of ``radius`` around a smoothly wandering centre, for z in ``z_range``."""
    sl = canvas.box((z_range[0], centre_yx[0] - radius - wiggle, centre_yx[1] - radius - wiggle),
                    (z_range[1], centre_yx[0] + radius + wiggle, centre_yx[1] + radius + wiggle))
    if sl is None:
        return None, None
    _, y, x = canvas.coords(sl)
    cy = centre_yx[0] + wiggle * 0.5 * path_field[0].along_z(canvas.z[sl[0]])
    cx = centre_yx[1] + wiggle * 0.5 * path_field[1].along_z(canvas.z[sl[0]])
    return sl, (y - cy[:, None, None]) ** 2 + (x - cx[:, None, None]) ** 2 < radius**2


# --------------------------------------------------------------------------------------------------
# How the scan varies

PHASES: dict[str, tuple[float, float, float]] = {
    "native": (0.0, 0.0, 0.0),
    "arterial": (1.6, 0.35, 1.25),
    "portal": (1.0, 1.0, 1.0),
    "delayed": (0.45, 0.75, 0.6),
}
"""Contrast phase -> enhancement of (blood, liver and spleen, kidneys) relative to the portal-venous
HU the organs are drawn with; 0 is unenhanced tissue (:data:`_NATIVE_HU`)."""

_GRAIN_HU = 30.0
"""Standard deviation of the liver's texture in textured phantoms (make_phantom's ``texture``)."""
_GRAIN_NODES = (28, 42, 42)
"""Nodes of the texture field over the canvas: about 1.5 voxels apart in z and 2 in-plane at the demo's
[32, 64, 64] grid, coarser than the scanner's noise."""

_PHASE_P = {"native": 0.15, "arterial": 0.25, "portal": 0.45, "delayed": 0.15}
_NATIVE_HU = {"blood": 45.0, "liver": 45.0, "kidney": 32.0}


@dataclass
class _Scan:
    """Everything about one scan that is not the patient's anatomy, drawn from its own random stream
    (so ``vary=False`` phantoms keep their anatomy): how big, where and how turned the patient lies in
    the field of view, the contrast phase, organs absent (splenectomy, nephrectomy), liver lesions,
    and the scanner's noise and blur.

    ``scale_zyx``/``shift_zyx`` map field-of-view coordinates to the patient's (:class:`_Canvas`):
    in-plane scale ``1 / size``; along z a different stretch of the body. ``rotation``/``tilt``:
    degrees about the z axis (patient turned on the table) and the x axis (tilted head to feet).
    """

    scale_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shift_zyx: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: float = 0.0
    tilt: float = 0.0
    phase: str = "portal"
    missing: tuple[str, ...] = ()
    lesions: int = 0
    noise_sd: float | None = None  # None: drawn with the anatomy (the fixed scan of vary=False)
    psf_mm: float = 0.9
    psf_z: float = 0.45
    rng: np.random.Generator | None = None

    @classmethod
    def draw(cls, seed: int) -> _Scan:
        rng = np.random.default_rng([seed, 0x5CA7])
        u = rng.uniform
        size = u(0.75, 1.0)
        phase = str(rng.choice(list(_PHASE_P), p=list(_PHASE_P.values())))
        missing = tuple(name for name, p in (("spleen", 0.1), ("kidney_right", 0.08), ("kidney_left", 0.08))
                        if rng.random() < p)
        return cls(scale_zyx=(u(0.85, 1.2), 1 / size, 1 / size), shift_zyx=(u(-0.35, 0.35), u(-0.1, 0.1), u(-0.1, 0.1)),
                   rotation=u(-15, 15), tilt=u(-8, 8), phase=phase, missing=missing, lesions=int(rng.poisson(0.8)),
                   noise_sd=u(5, 35), psf_mm=u(0.6, 1.6), psf_z=u(0.3, 0.9), rng=rng)

    def enhanced(self, tissue: str, hu):
        """``hu`` drawn for the portal-venous phase, as this scan's phase shows it."""
        factor = PHASES[self.phase][("blood", "liver", "kidney").index(tissue)]
        return _NATIVE_HU[tissue] + factor * (hu - _NATIVE_HU[tissue])

    def describe(self) -> dict:
        size = 1 / self.scale_zyx[1]
        return {"size": round(size, 3), "z_scale": round(self.scale_zyx[0], 3),
                "shift_zyx": [round(v, 3) for v in self.shift_zyx], "rotation_deg": round(self.rotation, 2),
                "tilt_deg": round(self.tilt, 2), "phase": self.phase, "missing": list(self.missing),
                "lesions": self.lesions, "noise_sd": None if self.noise_sd is None else round(self.noise_sd, 1),
                "psf_mm": round(self.psf_mm, 2), "psf_z_voxels": round(self.psf_z, 2)}


def _turn(image: np.ndarray, label: np.ndarray, spacing_zyx, rotation: float, tilt: float):
    """Rotate the painted volume about its centre, in mm: ``rotation`` degrees about z, then ``tilt``
    about x (one linear resampling of the image, nearest-neighbour for the labels)."""
    a, b = np.deg2rad(rotation), np.deg2rad(tilt)
    about_z = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_x = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    # output voxel -> input voxel: scale to mm, rotate, scale back
    matrix = (about_z @ about_x) * spacing[None, :] / spacing[:, None]
    centre = (np.asarray(image.shape) - 1) / 2
    offset = centre - matrix @ centre
    image = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
    label = ndimage.affine_transform(label, matrix, offset, order=0, mode="nearest")
    return image, label


# --------------------------------------------------------------------------------------------------
# The generator


@dataclass
class _Torso:
    """Whole-body parameters drawn first; every organ is placed relative to them.

    Lengths are normalised (see :class:`_Canvas`): ``bx``/``by`` body semi-axes, ``back`` the
    posterior semi-axis, ``fat``/``muscle`` layer thicknesses, ``diaphragm`` the z of the lung bases,
    ``spine_y`` the y of the vertebral bodies' centre and ``vb_r`` their radius.
    """

    bx: float
    by: float
    centre_y: float
    back: float
    fat: float
    muscle: float
    diaphragm: float
    vb_r: float
    spine_y: float
    interior: tuple = ()  # (slices, mask) inside the muscle wall
    wall: tuple = ()  # (slices, mask) inside the fat layer

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Torso:
        u = rng.uniform
        bx, by, centre_y = u(0.80, 0.92), u(0.56, 0.68), u(-0.08, 0.0)
        back = by * u(0.85, 0.95)  # the back is flatter than the front
        fat, muscle, diaphragm = u(0.03, 0.11), u(0.035, 0.06), u(-0.15, 0.1)
        vb_r = u(0.09, 0.11)
        # the spinous process (3.3 radii behind the body's centre) ends just inside the back muscles
        spine_y = centre_y + back - fat - u(0.02, 0.04) - 3.3 * vb_r
        return cls(bx, by, centre_y, back, fat, muscle, diaphragm, vb_r, spine_y)


def _paint_body(cv: _Canvas, rng, t: _Torso) -> None:
    """Skin-to-cavity layers (fat, muscle wall, visceral fat and bowel), ribs and the table."""
    u = rng.uniform
    power = u(2.0, 2.6)
    outline, texture = _Field(rng, (4, 5, 5)), _Field(rng, (10, 16, 16))
    sl = tuple(slice(0, n) for n in cv.image.shape)
    z, y, x = cv.coords(sl)
    dy = y - t.centre_y
    ay = np.where(dy > 0, t.back, t.by).astype(np.float32)
    taper = 1 + 0.04 * z  # the chest is a little wider than the upper abdomen
    radius = (np.abs(x / (t.bx * taper)) ** power + np.abs(dy / (ay * taper)) ** power) ** (1 / power)
    radius += 0.02 * outline(cv.z, cv.y, cv.x)
    tex = texture(cv.z, cv.y, cv.x)
    t.wall = (sl, radius < 1 - t.fat / t.by)
    t.interior = (sl, radius < 1 - (t.fat + t.muscle) / t.by)
    cv.paint(sl, radius < 1, u(-110, -85) + 8 * tex)
    cv.paint(sl, t.wall[1], u(35, 55))
    # bowel loops below the diaphragm, mostly fat in the mediastinum above
    soft = 1 / (1 + np.exp(-6 * (tex - 0.3 - 0.8 * (z > t.diaphragm))))
    cv.paint(sl, t.interior[1], -95 + 130 * soft)
    del soft, tex

    # Ribs: bands in the inner half of the chest wall, repeating along z, sloping down to the front.
    inner_radius = radius / (1 - (t.fat + t.muscle) / t.by)  # 1 on the inner surface of the wall
    pitch, height, slope = u(0.26, 0.34), u(0.09, 0.12), u(0.8, 1.2)
    phase = (z - slope * dy - u(0, 1)) % pitch
    ribs = ((inner_radius > 1.0) & (inner_radius < 1 + 0.7 * t.muscle / t.by) & (phase < height)
            & (z > t.diaphragm - 0.6) & (np.abs(x) > 0.15 * t.bx))
    cv.paint(sl, ribs, u(450, 650))

    # Table: a carbon-fibre plate (bright bottom skin) under a foam layer.
    top = t.centre_y + t.back + u(0.03, 0.06)
    plate = (y > top) & (y < top + 0.04) & (np.abs(x) < 0.95)
    cv.paint(sl, np.broadcast_to(plate, cv.image.shape), np.where(y > top + 0.03, 200.0, -850.0))


def _paint_muscles(cv: _Canvas, rng, t: _Torso) -> None:
    """Paraspinal muscles behind the spine, psoas muscles beside it below the diaphragm."""
    u = rng.uniform
    for side in (-1, 1):
        para = _Blob.draw(rng, (0, t.spine_y + t.vb_r * 1.8, side * u(0.2, 0.26)),
                          (3, u(0.13, 0.17), u(0.12, 0.16)), wobble=0.1)
        cv.paint(*para.mask(cv, t.wall), u(40, 55))
        psoas = _Blob.draw(rng, (-1.2, t.spine_y - 0.02, side * (t.vb_r + u(0.06, 0.1))),
                           (1.3 + t.diaphragm, u(0.06, 0.09), u(0.07, 0.1)), wobble=0.1)
        s, m = psoas.mask(cv, t.interior)
        if s is not None:
            cv.paint(s, m, u(40, 55))


def _paint_lungs(cv: _Canvas, rng, t: _Torso) -> None:
    """Both lungs above the diaphragm, with vessels (two crossing zero sets) thickest near the hila."""
    u = rng.uniform
    lung_hu = u(-880, -830)
    vessels = (_Field(rng, (20, 40, 40)), _Field(rng, (20, 40, 40)))
    for name, side in (("lung_right", -1), ("lung_left", 1)):
        az = u(1.1, 1.4)
        lung = _Blob.draw(rng, (t.diaphragm + az + (0.05 if side < 0 else 0), t.centre_y + t.by * 0.05,
                                side * t.bx * u(0.42, 0.5)),
                          (az, t.by * u(0.7, 0.8), t.bx * u(0.34, 0.4)), power=2.2, wobble=0.12)
        s, m = lung.mask(cv, t.interior)
        width = 0.1 + 0.15 * np.clip(1 - np.abs(cv.x[s[2]]) / t.bx * 1.6, 0, 1)
        f1, f2 = (f(cv.z[s[0]], cv.y[s[1]], cv.x[s[2]]) for f in vessels)
        vessel = (np.abs(f1) < width) & (np.abs(f2) < width)
        cv.paint(s, m, np.where(vessel, np.float32(80), lung_hu + 15 * f1), _LABEL[name])


def _paint_abdomen(cv: _Canvas, rng, t: _Torso) -> None:
    """Stomach (unlabelled), liver, spleen and kidneys below the diaphragm."""
    u = rng.uniform
    d, bx, by, cy = t.diaphragm, t.bx, t.by, t.centre_y

    # Stomach: soft-tissue wall, fluid, and gas at the front (the patient lies on the back).
    stomach = _Blob.draw(rng, (d - u(0.15, 0.35), cy - by * u(0.2, 0.35), bx * u(0.25, 0.4)),
                         (u(0.25, 0.4), by * u(0.25, 0.35), bx * u(0.22, 0.3)), wobble=0.2)
    s, m = stomach.mask(cv, t.interior)
    if s is not None:
        cv.paint(s, m, u(35, 50))
        gas_level = stomach.centre[1] - stomach.axes[1] * u(0.3, 0.6)
        cv.paint(s, ndimage.binary_erosion(m, iterations=2),
                 np.where(cv.coords(s)[1] < gas_level, np.float32(-990), np.float32(u(5, 25))))

    # Liver: a large right lobe and a smaller left lobe, with enhancing vessels.
    drawn_liver_hu = u(50, 75)
    liver_hu = cv.scan.enhanced("liver", drawn_liver_hu)
    portal_vein_hu = np.float32(cv.scan.enhanced("blood", drawn_liver_hu + 70))
    right = _Blob.draw(rng, (d - u(0.3, 0.4), cy + by * u(-0.05, 0.1), -bx * u(0.35, 0.45)),
                       (u(0.5, 0.6), by * u(0.6, 0.75), bx * u(0.45, 0.55)), angle=u(-0.3, 0.1))
    left = _Blob.draw(rng, (d - u(0.15, 0.25), cy - by * u(0.35, 0.45), bx * u(0.0, 0.15)),
                      (u(0.25, 0.35), by * u(0.25, 0.35), bx * u(0.3, 0.4)), angle=u(-0.3, 0.3), wobble=0.2)
    vessels = (_Field(rng, (8, 10, 10)), _Field(rng, (8, 10, 10)))
    for lobe in (right, left):
        s, m = lobe.mask(cv, t.interior)
        if s is None:
            continue
        f1, f2 = (f(cv.z[s[0]], cv.y[s[1]], cv.x[s[2]]) for f in vessels)
        vessel = (np.abs(f1) < 0.12) & (np.abs(f2) < 0.12)
        tissue = liver_hu + 6 * f1
        if cv.grain is not None:
            tissue = tissue + _GRAIN_HU * cv.grain(cv.z[s[0]], cv.y[s[1]], cv.x[s[2]])
        cv.paint(s, m, np.where(vessel, portal_vein_hu, tissue), _LABEL["liver"])
    _paint_lesions(cv, right, liver_hu)

    # Spleen: a crescent behind the stomach, HU close to the liver's.
    spleen = _Blob.draw(rng, (d - u(0.2, 0.35), cy + by * u(0.2, 0.3), bx * u(0.45, 0.52)),
                        (u(0.3, 0.4), by * u(0.35, 0.45), bx * u(0.15, 0.2)), angle=u(-0.7, -0.3))
    # the hollow faces the stomach: a blob centred just inside the spleen's medial surface
    medial = -0.9 * spleen.axes[2] * np.array([0, np.sin(spleen.angle), np.cos(spleen.angle)], np.float32)
    notch = _Blob.draw(rng, spleen.centre + medial, spleen.axes * np.array([1.3, 0.7, 0.5], np.float32),
                       angle=spleen.angle, wobble=0.05)
    spleen_hu = liver_hu + u(-12, 12)  # drawn either way: the anatomy's stream stays the same
    if cv.grain is not None:
        spleen_hu = liver_hu  # smooth, where the liver is grainy
    s, m = spleen.mask(cv, t.interior)
    if s is not None and "spleen" not in cv.scan.missing:
        m &= ~_restrict(notch.mask(cv), s, m.shape)
        cv.paint(s, m, spleen_hu, _LABEL["spleen"])

    # Kidneys beside the spine: bright cortex, darker medulla, a fat-filled hilum facing front-middle.
    drawn_kidney_hu = u(140, 180)
    cortex_hu, medulla_hu = (np.float32(cv.scan.enhanced("kidney", drawn_kidney_hu - d)) for d in (0, 50))
    if cv.grain is not None:  # around the liver's mean HU whatever the phase (drawn HU unused: same stream)
        cortex_hu, medulla_hu = np.float32(liver_hu + 20), np.float32(liver_hu - 40)
    for name, side in (("kidney_right", -1), ("kidney_left", 1)):
        drop = 0.1 if side < 0 else 0.0  # the right kidney sits lower, under the liver
        kidney = _Blob.draw(rng, (d - u(0.8, 0.9) - drop, t.spine_y - u(0.0, 0.08),
                                  side * (t.vb_r + u(0.2, 0.27))),
                            (u(0.45, 0.6), u(0.17, 0.21), u(0.12, 0.15)), angle=side * u(0.4, 0.8),
                            wobble=0.08)
        medulla = _Blob(kidney.centre, kidney.axes * 0.65, kidney.angle, 2.0, 0.2, kidney.field)
        hilum = _Blob.draw(rng, kidney.centre + np.array([0, -0.06, -side * 0.09], np.float32),
                           kidney.axes * np.array([0.4, 0.45, 0.45], np.float32), wobble=0.05)
        s, m = kidney.mask(cv, t.interior)
        if s is None or name in cv.scan.missing:
            continue
        m &= ~_restrict(hilum.mask(cv), s, m.shape)
        inner = _restrict(medulla.mask(cv), s, m.shape)
        cv.paint(s, m, np.where(inner, medulla_hu, cortex_hu), _LABEL[name])


def _paint_lesions(cv: _Canvas, lobe: _Blob, liver_hu: float) -> None:
    """The scan's hypodense liver lesions (cysts, metastases): round spots inside the liver, still
    labelled liver, placed with the scan's own random stream."""
    for _ in range(cv.scan.lesions):
        u = cv.scan.rng.uniform
        centre = lobe.centre + lobe.axes * np.array([u(-0.5, 0.5), u(-0.5, 0.5), u(-0.5, 0.5)], np.float32)
        radius = u(0.04, 0.1)
        sl = cv.box(centre - radius, centre + radius)
        if sl is None:
            continue
        z, y, x = cv.coords(sl)
        spot = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2)
        cv.paint(sl, spot & (cv.label[sl] == _LABEL["liver"]), liver_hu - u(20, 50))


def _paint_heart_and_vessels(cv: _Canvas, rng, t: _Torso) -> None:
    """Heart, ascending and descending aorta (contrast blood) and the unlabelled inferior vena cava."""
    u = rng.uniform
    blood_hu = cv.scan.enhanced("blood", u(150, 250))
    # on the diaphragm, left of centre and in front; myocardium around the blood pool
    centre = (t.diaphragm + u(0.45, 0.6), t.centre_y - t.by * u(0.2, 0.3), t.bx * u(0.08, 0.18))
    axes = (u(0.5, 0.65), t.by * u(0.42, 0.5), t.bx * u(0.3, 0.36))
    heart = _Blob.draw(rng, centre, axes, angle=u(0.4, 0.8), wobble=0.1)
    s, m = heart.mask(cv, t.interior)
    if s is not None:
        pool = _Blob(heart.centre, heart.axes * np.array([0.85, 0.7, 0.7], np.float32), heart.angle, 2.0,
                     0.3, heart.field)
        blood = _restrict(pool.mask(cv), s, m.shape)
        cv.paint(s, m, np.where(blood, np.float32(blood_hu), np.float32(u(45, 65))), _LABEL["heart"])

    aorta_r = u(0.07, 0.09)
    paths = [(_Field(rng, (5, 2, 2)), _Field(rng, (5, 2, 2))) for _ in range(3)]
    descending = _tube(cv, paths[0], (t.spine_y - t.vb_r - aorta_r - 0.02, u(0.06, 0.12)), aorta_r,
                       (-2, 2), 0.04)
    ascending = _tube(cv, paths[1], (heart.centre[1] - 0.05, heart.centre[2] - 0.1), aorta_r * 1.1,
                      (heart.centre[0] + heart.axes[0] * 0.5, 2), 0.04)
    for s, m in (descending, ascending):
        if s is not None:
            cv.paint(s, m, blood_hu, _LABEL["aorta"])
    s, m = _tube(cv, paths[2], (t.spine_y - t.vb_r - 0.08, -u(0.12, 0.18)), u(0.06, 0.08),
                 (-2, t.diaphragm + 0.15), 0.03)
    if s is not None:
        cv.paint(s, m, cv.scan.enhanced("blood", u(100, 140)), 0)


def _paint_spine(cv: _Canvas, rng, t: _Torso) -> None:
    """Vertebral bodies (trabecular bone in a cortical shell) between discs, the canal with the cord,
    the neural arch with spinous and transverse processes; the spine follows a gentle random curve."""
    u = rng.uniform
    r = t.vb_r
    curve = (_Field(rng, (4, 2, 2)), _Field(rng, (4, 2, 2)))
    pitch, disc = u(0.3, 0.38), u(0.05, 0.07)
    s = cv.box((-2, t.spine_y - r * 1.3, -r * 2.5), (2, t.spine_y + r * 3.6, r * 2.5))
    z, y, x = cv.coords(s)
    sy = t.spine_y + 0.03 * curve[0].along_z(cv.z[s[0]])[:, None, None]
    x = x - 0.02 * curve[1].along_z(cv.z[s[0]])[:, None, None]
    r_body = np.sqrt((x / (r * 1.15)) ** 2 + ((y - sy) / r) ** 2)
    phase = (z - u(0, 1)) % pitch
    is_disc = phase < disc
    canal_y = sy + r * 1.6
    r_canal = np.sqrt(x**2 + (y - canal_y) ** 2) / (r * 0.55)
    # the processes occupy only part of each vertebra's height
    processes = (phase > disc + 0.1 * pitch) & (phase < disc + 0.6 * pitch)
    arch = (r_canal >= 1) & (r_canal < 1.7) & (y > sy + r * 0.8)
    spinous = processes & (np.abs(x) < r * 0.25) & (y > canal_y) & (y < canal_y + r * 1.7)
    transverse = processes & (np.abs(y - canal_y + r * 0.2) < r * 0.25) & (np.abs(x) < r * 1.9)
    bone = ((r_body < 1) | arch | spinous | transverse) & ~is_disc
    trabecular_hu, cortical_hu = u(250, 400), u(700, 1000)
    cv.paint(s, (r_body < 1) & is_disc, u(70, 100), 0)
    shell = r_body > 0.85  # the vertebral body's rim and all of the arch are cortical bone
    cv.paint(s, bone, np.where(shell, np.float32(cortical_hu), np.float32(trabecular_hu)), _LABEL["spine"])
    cv.paint(s, r_canal < 1, u(15, 35), 0)


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (64, 160, 160),
    spacing_zyx: tuple[float, float, float] = (2.5, 1.5, 1.5),
    *,
    vary: bool = False,
    texture: bool = False,
) -> Phantom:
    """Generate one CT phantom; the result is a deterministic function of the arguments.

    Args:
        seed: random seed (any non-negative int).
        shape: ``(z, y, x)`` voxels.
        spacing_zyx: voxel size in mm; it sets the blur and noise correlation lengths in voxels.
        vary: vary the scan as CT varies (:class:`_Scan`): patient size, position and pose (turned up
            to 15 degrees, tilted up to 8), which stretch of the body the field of view covers, the
            contrast phase (native, arterial, portal-venous, delayed), a missing spleen or kidney,
            liver lesions, noise, sharpness and slice profile. The anatomy is the same as without.
            Without: the anatomy fills the field of view, upright and centred, in portal-venous phase.
        texture: organs told apart by texture and structure rather than by mean HU: liver, spleen and
            kidneys get the liver's mean HU; the liver is grainy (a random texture of 30 HU, from a
            random stream of its own) around its vessels, the spleen smooth, the kidneys a bright
            cortex around a dark medulla. Anatomy, scan and noise are the same as without.

    Returns:
        A :class:`Phantom` with int16 HU and uint8 labels (:data:`LABEL_NAMES`).
    """
    if len(shape) != 3 or min(shape) < 4:
        raise VolumeFusionError(f"phantom shape {tuple(shape)}: need three sizes (z, y, x) of >= 4 voxels")
    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise VolumeFusionError(f"phantom spacing_zyx {tuple(spacing_zyx)}: need three positive sizes in mm")
    spacing_zyx = tuple(float(s) for s in spacing_zyx)
    rng = np.random.default_rng(seed)
    scan = _Scan.draw(seed) if vary else _Scan()
    grain = _Field(np.random.default_rng([seed, 0x6A1]), _GRAIN_NODES) if texture else None
    cv = _Canvas(tuple(int(n) for n in shape), spacing_zyx, scan, grain)
    torso = _Torso.draw(rng)
    # later structures overwrite earlier ones where they overlap (HU and label alike)
    for paint in (_paint_body, _paint_muscles, _paint_lungs, _paint_abdomen, _paint_heart_and_vessels,
                  _paint_spine):
        paint(cv, rng, torso)

    image, label = cv.image, cv.label
    if scan.rotation or scan.tilt:
        image, label = _turn(image, label, spacing_zyx, scan.rotation, scan.tilt)

    # Imaging: white noise blurred with the point-spread function together with the anatomy gives
    # CT-like correlated noise of standard deviation noise_sd. PSF sigma: 0.9 mm in-plane by default;
    # along z a slice profile about one slice wide.
    psf = (scan.psf_z, scan.psf_mm / spacing_zyx[1], scan.psf_mm / spacing_zyx[2])  # voxels
    noise_sd = rng.uniform(8, 20)  # drawn either way: the anatomy's stream stays the same
    if scan.noise_sd is not None:
        noise_sd = scan.noise_sd
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += noise * np.float32(noise_sd / _noise_gain(psf))
    image = ndimage.gaussian_filter(image, psf, truncate=3.0)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Phantom(image=image, label=label, spacing_zyx=spacing_zyx, scan=scan.describe() if vary else {})


def _noise_gain(sigma) -> float:
    """Standard deviation of white unit noise after :func:`scipy.ndimage.gaussian_filter` with ``sigma``."""
    gain = 1.0
    for s in sigma:
        impulse = np.zeros(33)
        impulse[16] = 1
        gain *= float(np.sqrt(np.sum(ndimage.gaussian_filter1d(impulse, s, truncate=3.0) ** 2)))
    return gain


# --------------------------------------------------------------------------------------------------
# Writing phantoms as files


def _geometry(phantom: Phantom):
    """Identity direction, world origin chosen so the volume is centred on (0, 0, 0) mm."""
    shape = phantom.image.shape
    origin_zyx = [-(n - 1) * sp / 2 for n, sp in zip(shape, phantom.spacing_zyx)]
    return Geometry(shape, phantom.spacing_zyx, tuple(reversed(origin_zyx)))


def _write_cases(image_dir: Path, label_dir: Path | None, seeds: Iterable[int], fmt: str, shape, spacing_zyx,
                 vary: bool, texture: bool) -> list[tuple[str, Path, Path | None]]:
    written = []
    for seed in seeds:
        phantom = make_phantom(int(seed), shape, spacing_zyx, vary=vary, texture=texture)
        geometry = _geometry(phantom)
        name = f"phantom_{int(seed):04d}"
        image_path = image_dir / f"{name}.{fmt}"
        write_image(image_path, phantom.image, geometry)
        label_path = None
        if label_dir is not None:
            label_path = label_dir / f"{name}.{fmt}"
            write_image(label_path, phantom.label, geometry)
        written.append((name, image_path, label_path))
    return written


def write_phantoms(
    out_dir: str | Path,
    seeds: Iterable[int],
    with_labels: bool = False,
    fmt: str = "nii.gz",
    *,
    shape: tuple[int, int, int] = (64, 160, 160),
    spacing_zyx: tuple[float, float, float] = (2.5, 1.5, 1.5),
    vary: bool = False,
    texture: bool = False,
) -> list[Path]:
    """Write one phantom per seed as ``out_dir/images/phantom_<seed>.<fmt>`` (int16 HU).

    With ``with_labels`` the label maps go to ``out_dir/labels/`` under the same names, so
    ``out_dir/images`` holds only images and can be given to ``prepare`` as a folder.

    Args:
        fmt: any extension :func:`volumefusion.io.write_image` knows (``nii.gz``, ``nrrd``, ``mha``...).
        vary, texture: as in :func:`make_phantom`.

    Returns:
        The image paths, in the order of ``seeds``.
    """
    out_dir = Path(out_dir)
    label_dir = out_dir / "labels" if with_labels else None
    cases = _write_cases(out_dir / "images", label_dir, seeds, fmt.lstrip("."), shape, spacing_zyx, vary, texture)
    return [image for _, image, _ in cases]


def write_msd_dataset(
    out_dir: str | Path,
    seeds: Iterable[int],
    name: str = "Phantom",
    *,
    shape: tuple[int, int, int] = (64, 160, 160),
    spacing_zyx: tuple[float, float, float] = (2.5, 1.5, 1.5),
    vary: bool = False,
    texture: bool = False,
) -> Path:
    """Write labelled phantoms as a Medical Segmentation Decathlon / nnU-Net raw dataset.

    Layout: ``out_dir/dataset.json`` (``labels`` ``{"0": "background", ...}``, ``training`` entries
    ``{"image": "./imagesTr/<case>.nii.gz", "label": "./labelsTr/<case>.nii.gz"}``), ``imagesTr/``,
    ``labelsTr/``; ``vary`` and ``texture`` as in :func:`make_phantom`. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    cases = _write_cases(out_dir / "imagesTr", out_dir / "labelsTr", seeds, "nii.gz", shape, spacing_zyx, vary,
                         texture)
    dataset = {
        "name": name,
        "description": "procedural CT phantoms (volumefusion.data.phantoms)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "numTraining": len(cases),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
                     for case, _, _ in cases],
        "test": [],
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(dataset, indent=1) + "\n")
    return out_dir
