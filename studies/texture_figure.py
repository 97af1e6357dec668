"""The picture of textured phantoms in docs/method.md: plain and textured versions of development
phantoms at the demo's grid, one abdominal slice each, and the labels they share.

Usage: python studies/texture_figure.py docs/images/phantom_texture.png
"""

from __future__ import annotations

import sys

import numpy as np

from volumefusion.data.phantoms import LABEL_NAMES, make_phantom
from volumefusion.viz import save_montage

SEEDS = (52000, 52003, 53001)
GRID = dict(shape=(32, 64, 64), spacing_zyx=(5.0, 5.6, 5.6), vary=True)


def main() -> None:
    plain = [make_phantom(seed, **GRID) for seed in SEEDS]
    textured = [make_phantom(seed, **GRID, texture=True) for seed in SEEDS]
    # the slice that shows most of liver, spleen and kidneys together, where the change is
    def shown(label2d):
        return sum(min(int((label2d == organ).sum()), 40) for organ in (5, 6, 7, 8))
    slices = [int(np.argmax([shown(p.label[z]) for z in range(p.label.shape[0])])) for p in plain]
    save_montage(sys.argv[1], [
        ("plain", [p.image[z] for p, z in zip(plain, slices)]),
        ("textured", [p.image[z] for p, z in zip(textured, slices)]),
        ("labels", [p.label[z] for p, z in zip(plain, slices)], "label"),
    ], col_titles=[f"phantom {s}, slice {z}" for s, z in zip(SEEDS, slices)], window=(-200, 300),
        label_names=list(LABEL_NAMES.values()), cell=2.6,
        title="Textured phantoms: liver, spleen and kidneys at one mean HU, told apart by texture")


if __name__ == "__main__":
    main()
