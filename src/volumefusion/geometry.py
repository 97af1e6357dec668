"""Where a voxel array sits in physical space: :class:`Geometry` (ITK conventions, millimetres).

``origin`` is the centre of voxel ``(0, 0, 0)``, ``direction`` the row-major 3x3 matrix whose columns
are the x, y, z index axes, in physical LPS coordinates; shape and spacing are in array order (z, y, x).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """Where a ``(z, y, x)`` voxel array sits in physical space (ITK conventions, millimetres).

    ``shape_zyx`` and ``spacing_zyx`` are in array order; ``origin`` (x, y, z) and ``direction``
    (9 floats, row-major, columns = index axes x, y, z) are in ITK's physical order, as SimpleITK
    reports them.
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "shape_zyx", tuple(int(v) for v in self.shape_zyx))
        object.__setattr__(self, "spacing_zyx", tuple(float(v) for v in self.spacing_zyx))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.shape_zyx) != 3 or len(self.spacing_zyx) != 3 or len(self.origin) != 3:
            raise ValueError(f"Geometry needs 3 values for shape, spacing and origin, got {self}")
        if len(self.direction) != 9:
            raise ValueError(f"Geometry.direction needs 9 values, got {len(self.direction)}")

    def to_dict(self) -> dict:
        """JSON-serialisable; floats survive ``json`` exactly."""
        return {"shape_zyx": list(self.shape_zyx), "spacing_zyx": list(self.spacing_zyx),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(d["shape_zyx"]), tuple(d["spacing_zyx"]), tuple(d["origin"]), tuple(d["direction"]))

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        """Geometry of a 3D ``SimpleITK.Image``."""
        return cls(tuple(reversed(image.GetSize())), tuple(reversed(image.GetSpacing())),
                   image.GetOrigin(), image.GetDirection())

    def apply_to(self, image) -> None:
        """Set spacing, origin and direction of a 3D ``SimpleITK.Image`` (its size must match)."""
        if tuple(reversed(image.GetSize())) != self.shape_zyx:
            raise ValueError(f"image size {image.GetSize()} (x y z) does not match geometry {self.shape_zyx}")
        image.SetSpacing(tuple(reversed(self.spacing_zyx)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
