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

Cost: a ``[64, 160, 160]`` phantom takes about 0.3 s on one CPU core. Every shape is evaluated only
inside its bounding box, and smooth random fields are separable Gaussian-kernel interpolations of a
coarse normal grid (three small matrix products), never full-volume filters. The only full-volume
filter is the final point-spread blur.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from volumefusion import VolumeFusionError

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
    """

    image: np.ndarray
    label: np.ndarray
    spacing_zyx: tuple[float, float, float]


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


class _Canvas:
    """The volume being painted, with normalised coordinates.

    In-plane coordinates are in units of half the smaller in-plane extent (so circles stay round in
    mm), z in units of half the z extent; all are 0 at the centre of the field of view.
    """

    def __init__(self, shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float]):
        extent = [n * s for n, s in zip(shape, spacing_zyx)]
        half_inplane = min(extent[1], extent[2]) / 2
        scales = (extent[0] / 2, half_inplane, half_inplane)
        self.z, self.y, self.x = (
            (((np.arange(n) + 0.5) * s - e / 2) / r).astype(np.float32)
            for n, s, e, r in zip(shape, spacing_zyx, extent, scales)
        )
        self.voxel = np.array([s / r for s, r in zip(spacing_zyx, scales)], dtype=np.float32)
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
        """Set HU (scalar or array over the box) and optionally the label where ``mask`` is true."""
        region = self.image[sl]
        region[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
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
        reach = self.axes.max() * (1 + self.wobble) ** (1 / self.power) * 1.05
        half = np.array([self.axes[0] * (1 + self.wobble) ** (1 / self.power) * 1.05, reach, reach])
        sl = canvas.box(self.centre - half, self.centre + half)
        if sl is None:
            return None, None
        z, y, x = canvas.coords(sl)
        dz, dy, dx = z - self.centre[0], y - self.centre[1], x - self.centre[2]
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = (c * dx + s * dy) / self.axes[2], (c * dy - s * dx) / self.axes[1]
        p = self.power
        f = np.abs(dz / self.axes[0]) ** p + np.abs(u) ** p + np.abs(v) ** p
        local = [(cc[s_] - m) / a for cc, s_, m, a in zip((canvas.z, canvas.y, canvas.x), sl, self.centre,
                                                           np.full(3, 1.0, np.float32))]
        inside = f < 1 + self.wobble * self.field(*local)
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


def _tube(canvas: _Canvas, rng, path_field: tuple[_Field, _Field], centre_yx, radius, z_range, wiggle):
    """A vertical vessel: a disc of ``radius`` around a smoothly wandering centre, for z in ``z_range``."""
    sl = canvas.box((z_range[0], centre_yx[0] - radius - wiggle, centre_yx[1] - radius - wiggle),
                    (z_range[1], centre_yx[0] + radius + wiggle, centre_yx[1] + radius + wiggle))
    if sl is None:
        return None, None
    z, y, x = canvas.coords(sl)
    zc = canvas.z[sl[0]]
    zero = np.zeros(1, np.float32)
    cy = centre_yx[0] + wiggle * 0.5 * path_field[0](zc, zero, zero)[:, 0, 0]
    cx = centre_yx[1] + wiggle * 0.5 * path_field[1](zc, zero, zero)[:, 0, 0]
    return sl, (y - cy[:, None, None]) ** 2 + (x - cx[:, None, None]) ** 2 < radius**2


# --------------------------------------------------------------------------------------------------
# The generator


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (64, 160, 160),
    spacing_zyx: tuple[float, float, float] = (2.5, 1.5, 1.5),
) -> Phantom:
    """Generate one CT phantom; the result is a deterministic function of the arguments.

    Args:
        seed: random seed (any non-negative int).
        shape: ``(z, y, x)`` voxels.
        spacing_zyx: voxel size in mm; it sets the blur and noise correlation lengths in voxels.

    Returns:
        A :class:`Phantom` with int16 HU and uint8 labels (:data:`LABEL_NAMES`).
    """
    if len(shape) != 3 or min(shape) < 4:
        raise VolumeFusionError(f"phantom shape {tuple(shape)}: need three sizes (z, y, x) of at least 4 voxels")
    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise VolumeFusionError(f"phantom spacing_zyx {tuple(spacing_zyx)}: need three positive sizes in mm")
    rng = np.random.default_rng(seed)
    cv = _Canvas(tuple(int(n) for n in shape), tuple(float(s) for s in spacing_zyx))
    u = rng.uniform

    # Body outline: a superquadric cylinder, flatter at the back, with fat and muscle layers.
    bx, by = u(0.80, 0.92), u(0.56, 0.68)  # semi-axes (x, y)
    body_cy = u(-0.08, 0.0)
    back = by * u(0.85, 0.95)  # posterior semi-axis (the back is flatter)
    power = u(2.0, 2.6)
    fat = u(0.03, 0.11)
    muscle = u(0.035, 0.06)
    diaphragm = u(-0.15, 0.1)  # z of the lung bases
    body_field = _Field(rng, (4, 5, 5))
    texture = _Field(rng, (10, 16, 16))

    sl = (slice(None),) * 3
    z, y, x = cv.coords(sl)
    dy = y - body_cy
    ay = np.where(dy > 0, back, by).astype(np.float32)
    taper = 1 + 0.04 * z  # the chest is a little wider than the upper abdomen
    radius = (np.abs(x / (bx * taper)) ** power + np.abs(dy / (ay * taper)) ** power) ** (1 / power)
    radius += 0.02 * body_field(cv.z, cv.y, cv.x)
    body = radius < 1
    wall = radius < 1 - fat / by
    interior = radius < 1 - (fat + muscle) / by
    cv.paint(sl, body, u(-110, -85) + 8 * texture(cv.z, cv.y, cv.x))
    cv.paint(sl, wall, u(35, 55))
    inner_radius = radius / (1 - (fat + muscle) / by)  # 1 on the inner surface of the muscle wall
    del radius

    # Table under the patient: a thin carbon-fibre plate with foam above it.
    table_y = body_cy + back + u(0.03, 0.06)
    plate = (y > table_y) & (y < table_y + 0.04) & (np.abs(x) < 0.95)
    cv.paint(sl, np.broadcast_to(plate, cv.image.shape), np.float32(-500) + 700 * (y > table_y + 0.03))

    # Visceral fat and soft tissue (bowel loops below the diaphragm, mediastinal fat above).
    soft = 1 / (1 + np.exp(-6 * (texture(cv.z, cv.y, cv.x) - 0.3 + 0.8 * (z > diaphragm))))
    cv.paint(sl, interior, -95 + 130 * soft)
    del soft
    interior_region = (sl, interior)

    # Spine geometry (used by several organs).
    spine_y = body_cy + back * u(0.45, 0.55)
    vb_r = u(0.13, 0.17)  # vertebral body radius
    curve = (_Field(rng, (4, 2, 2)), _Field(rng, (4, 2, 2)))

    # Paraspinal muscles behind the spine and psoas muscles beside it below the diaphragm.
    for side in (-1, 1):
        para = _Blob.draw(rng, (0, spine_y + vb_r * 1.8, side * u(0.2, 0.26)),
                          (3, u(0.13, 0.17), u(0.12, 0.16)), wobble=0.1)
        s, m = para.mask(cv, (sl, wall))
        cv.paint(s, m, u(40, 55))
        psoas = _Blob.draw(rng, (-1.2, spine_y - 0.02, side * (vb_r + u(0.06, 0.1))),
                           (1.3 + diaphragm, u(0.06, 0.09), u(0.07, 0.1)), wobble=0.1)
        s, m = psoas.mask(cv, interior_region)
        if s is not None:
            cv.paint(s, m, u(40, 55))

    # Ribs: bands in the chest wall, repeating along z, sloping down towards the front.
    rib_pitch, rib_height, rib_slope = u(0.26, 0.34), u(0.09, 0.12), u(0.3, 0.5)
    rib_phase = (z + rib_slope * (-dy) - u(0, 1)) % rib_pitch
    ribs = (
        (inner_radius > 1.0) & (inner_radius < 1 + 0.7 * muscle / by)
        & (rib_phase < rib_height) & (z > diaphragm - 0.6) & (np.abs(x) > 0.15 * bx)
    )
    cv.paint(sl, ribs, np.float32(u(450, 650)))
    del rib_phase, ribs, inner_radius, dy

    # Lungs, with vessels thickest near the hila.
    lung_hu = u(-880, -830)
    vessels = (_Field(rng, (12, 18, 18)), _Field(rng, (12, 18, 18)))
    for name, side in (("lung_right", -1), ("lung_left", 1)):
        az = u(1.1, 1.4)
        lung = _Blob.draw(rng, (diaphragm + az + (0.05 if side < 0 else 0), body_cy + by * 0.05,
                                side * bx * u(0.42, 0.5)),
                          (az, by * u(0.7, 0.8), bx * u(0.34, 0.4)), power=2.2, wobble=0.12)
        s, m = lung.mask(cv, interior_region)
        lz, ly, lx = cv.coords(s)
        width = 0.06 + 0.1 * np.clip(1 - np.abs(lx) / bx * 1.6, 0, 1)
        f1 = vessels[0](cv.z[s[0]], cv.y[s[1]], cv.x[s[2]])
        f2 = vessels[1](cv.z[s[0]], cv.y[s[1]], cv.x[s[2]])
        vessel = (np.abs(f1) < width) & (np.abs(f2) < width)
        cv.paint(s, m, np.where(vessel, np.float32(40), lung_hu + 15 * f1), _LABEL[name])

    # Stomach (unlabelled): soft-tissue wall, fluid, and gas at the front.
    stomach = _Blob.draw(rng, (diaphragm - u(0.15, 0.35), body_cy - by * u(0.2, 0.35), bx * u(0.25, 0.4)),
                         (u(0.25, 0.4), by * u(0.25, 0.35), bx * u(0.22, 0.3)), wobble=0.2)
    s, m = stomach.mask(cv, interior_region)
    if s is not None:
        cv.paint(s, m, u(35, 50))
        lumen = ndimage.binary_erosion(m, iterations=2)
        _, sy, _ = cv.coords(s)
        gas_level = stomach.centre[1] - stomach.axes[1] * u(0.3, 0.6)
        cv.paint(s, lumen, np.where(sy < gas_level, np.float32(-990), np.float32(u(5, 25))))

    # Liver: a large right lobe and a smaller left lobe, with enhancing vessels.
    liver_hu = u(50, 75)
    right = _Blob.draw(rng, (diaphragm - u(0.3, 0.4), body_cy + by * u(-0.05, 0.1), -bx * u(0.35, 0.45)),
                       (u(0.5, 0.6), by * u(0.6, 0.75), bx * u(0.45, 0.55)), angle=u(-0.3, 0.1), wobble=0.15)
    left = _Blob.draw(rng, (diaphragm - u(0.15, 0.25), body_cy - by * u(0.35, 0.45), bx * u(0.0, 0.15)),
                      (u(0.25, 0.35), by * u(0.25, 0.35), bx * u(0.3, 0.4)), angle=u(-0.3, 0.3), wobble=0.2)
    liver_vessels = (_Field(rng, (8, 10, 10)), _Field(rng, (8, 10, 10)))
    for lobe in (right, left):
        s, m = lobe.mask(cv, interior_region)
        if s is None:
            continue
        f1 = liver_vessels[0](cv.z[s[0]], cv.y[s[1]], cv.x[s[2]])
        f2 = liver_vessels[1](cv.z[s[0]], cv.y[s[1]], cv.x[s[2]])
        vessel = (np.abs(f1) < 0.12) & (np.abs(f2) < 0.12)
        cv.paint(s, m, np.where(vessel, np.float32(liver_hu + 70), liver_hu + 6 * f1), _LABEL["liver"])

    # Spleen: a crescent behind the stomach, HU close to the liver's.
    spleen = _Blob.draw(rng, (diaphragm - u(0.2, 0.35), body_cy + by * u(0.3, 0.45), bx * u(0.55, 0.68)),
                        (u(0.22, 0.32), by * u(0.3, 0.38), bx * u(0.13, 0.17)), angle=u(-0.7, -0.3), wobble=0.15)
    notch = _Blob.draw(rng, spleen.centre + np.array([0, -0.06, -0.12], np.float32),
                       spleen.axes * np.array([1.2, 0.6, 0.7], np.float32), angle=spleen.angle, wobble=0.05)
    s, m = spleen.mask(cv, interior_region)
    if s is not None:
        m &= ~_restrict(notch.mask(cv), s, m.shape)
        cv.paint(s, m, liver_hu + u(-12, 12), _LABEL["spleen"])

    # Kidneys: bright cortex, darker medulla, fat in the hilum facing front and middle.
    kidney_hu = u(140, 180)
    for name, side in (("kidney_right", -1), ("kidney_left", 1)):
        drop = 0.1 if side < 0 else 0.0  # the right kidney sits lower, under the liver
        kidney = _Blob.draw(rng, (diaphragm - u(0.8, 0.9) - drop, spine_y - u(0.0, 0.08),
                                  side * (vb_r + u(0.2, 0.27))),
                            (u(0.45, 0.6), u(0.17, 0.21), u(0.12, 0.15)),
                            angle=side * u(0.4, 0.8), wobble=0.08)
        s, m = kidney.mask(cv, interior_region)
        medulla = _Blob(kidney.centre, kidney.axes * 0.65, kidney.angle, 2.0, 0.2, kidney.field)
        hilum = _Blob.draw(rng, kidney.centre + np.array([0, -0.06, -side * 0.09], np.float32),
                           kidney.axes * np.array([0.4, 0.45, 0.45], np.float32), wobble=0.05)
        if s is None:
            continue
        m &= ~_restrict(hilum.mask(cv), s, m.shape)
        inner = _restrict(medulla.mask(cv), s, m.shape)
        cv.paint(s, m, np.where(inner, np.float32(kidney_hu - 50), np.float32(kidney_hu)), _LABEL[name])

    # Heart on the diaphragm, left of centre and in front; myocardium around a contrast blood pool.
    blood_hu = u(150, 250)
    heart = _Blob.draw(rng, (diaphragm + u(0.45, 0.6), body_cy - by * u(0.2, 0.3), bx * u(0.08, 0.18)),
                       (u(0.5, 0.65), by * u(0.42, 0.5), bx * u(0.3, 0.36)), angle=u(0.4, 0.8), wobble=0.1)
    s, m = heart.mask(cv, interior_region)
    if s is not None:
        pool = _Blob(heart.centre, heart.axes * np.array([0.85, 0.7, 0.7], np.float32), heart.angle, 2.0,
                     0.3, heart.field)
        cv.paint(s, m, np.where(_restrict(pool.mask(cv), s, m.shape), np.float32(blood_hu), np.float32(u(45, 65))),
                 _LABEL["heart"])

    # Vessels: the descending aorta left-front of the spine, the ascending aorta out of the heart,
    # and the (unlabelled) inferior vena cava on the right.
    aorta_r = u(0.07, 0.09)
    desc = (_Field(rng, (5, 2, 2)), _Field(rng, (5, 2, 2)))
    s, m = _tube(cv, rng, desc, (spine_y - vb_r - aorta_r - 0.02, u(0.06, 0.12)), aorta_r, (-2, 2), 0.04)
    cv.paint(s, m, blood_hu, _LABEL["aorta"])
    asc = (_Field(rng, (5, 2, 2)), _Field(rng, (5, 2, 2)))
    s, m = _tube(cv, rng, asc, (heart.centre[1] - 0.05, heart.centre[2] - 0.1), aorta_r * 1.1,
                 (heart.centre[0] + heart.axes[0] * 0.5, 2), 0.04)
    if s is not None:
        cv.paint(s, m, blood_hu, _LABEL["aorta"])
    ivc = (_Field(rng, (5, 2, 2)), _Field(rng, (5, 2, 2)))
    s, m = _tube(cv, rng, ivc, (spine_y - vb_r - 0.08, -u(0.12, 0.18)), u(0.06, 0.08),
                 (-2, diaphragm + 0.15), 0.03)
    if s is not None:
        cv.paint(s, m, u(100, 140), 0)

    # Spine: vertebral bodies (trabecular bone in a cortical shell) separated by discs, the canal
    # with the cord, the neural arch and the spinous process.
    pitch, disc = u(0.3, 0.38), u(0.05, 0.07)
    s = cv.box((-2, spine_y - vb_r * 1.3, -vb_r * 2.5), (2, spine_y + vb_r * 4.5, vb_r * 2.5))
    z, y, x = cv.coords(s)
    zero = np.zeros(1, np.float32)
    sy = spine_y + 0.03 * curve[0](cv.z[s[0]], zero, zero)[:, :, :1]
    sx = 0.02 * curve[1](cv.z[s[0]], zero, zero)[:, :, :1]
    x = x - sx
    r_body = np.sqrt((x / (vb_r * 1.15)) ** 2 + ((y - sy) / vb_r) ** 2)
    is_disc = (z - u(0, 1)) % pitch < disc
    canal_y = sy + vb_r * 1.55
    r_canal = np.sqrt(x**2 + (y - canal_y) ** 2) / (vb_r * 0.5)
    arch = (r_canal >= 1) & (r_canal < 1.6) & (y > sy + vb_r * 0.8)
    spinous = (np.abs(x) < vb_r * 0.25) & (y > canal_y) & (y < canal_y + vb_r * 2.2)
    transverse = (np.abs(y - canal_y + vb_r * 0.3) < vb_r * 0.25) & (np.abs(x) < vb_r * 2.0)
    bone = ((r_body < 1) | arch | spinous | transverse) & ~is_disc
    cortical = bone & ((r_body > 0.85) | ~(r_body < 1))
    trabecular_hu, cortical_hu = u(250, 400), u(700, 1000)
    cv.paint(s, (r_body < 1) & is_disc, u(70, 100), 0)
    cv.paint(s, bone, np.where(cortical, np.float32(cortical_hu), np.float32(trabecular_hu)), _LABEL["spine"])
    cv.paint(s, np.broadcast_to(r_canal < 1, bone.shape), u(15, 35), 0)

    # Imaging: a Gaussian point-spread function, and quantum noise correlated by the same kernel.
    psf = np.array([0.45, 0.6, 0.6]) * np.array([1.5, 1.0, 1.0])  # voxels (z is the slice profile)
    noise_sd = u(8, 20)
    gain = _noise_gain(psf)
    cv.image += rng.standard_normal(cv.image.shape, dtype=np.float32) * np.float32(noise_sd / gain)
    image = ndimage.gaussian_filter(cv.image, psf, truncate=3.0)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Phantom(image=image, label=cv.label, spacing_zyx=tuple(float(s) for s in spacing_zyx))


def _noise_gain(sigma) -> float:
    """Standard deviation of white unit noise after :func:`scipy.ndimage.gaussian_filter` with ``sigma``."""
    gain = 1.0
    for s in sigma:
        impulse = np.zeros(33)
        impulse[16] = 1
        gain *= float(np.sqrt(np.sum(ndimage.gaussian_filter1d(impulse, s, truncate=3.0) ** 2)))
    return gain
