"""``volumefusion show SUBJECT``: pictures that explain the method and the data.

Subjects: ``fusion`` (Volume Fusion on real CT: background, foreground, fused input, class map).
"""

from __future__ import annotations

import argparse

from volumefusion.commands import add_config_args

FUSION_EXAMPLE = """\
examples:
  volumefusion show fusion --out fusion.png                      # the sample chest CT (slicerio)
  volumefusion show fusion --out grid.png --mode grid --samples 6
  volumefusion show fusion --out mine.png -i ct/ scan.nrrd       # images, folders of them, or a store
"""


def register(sub) -> None:
    p = sub.add_parser(
        "show", help="pictures that explain the method and the data (PNG)",
        description="Write a PNG that shows one subject.\n\n" + FUSION_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subjects = p.add_subparsers(dest="subject", metavar="SUBJECT", required=True)
    f = subjects.add_parser(
        "fusion", help="Volume Fusion on real CT: background, foreground, fused input, class map",
        description="Fuse random crops of real CT as pretraining does and draw, for a few samples, the "
                    "middle axial slice of the background, the foreground, the fused network input and "
                    "the class map the network learns to predict (alpha = class / K).\n\n" + FUSION_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--out", "-o", required=True, metavar="PNG", help="picture to write")
    f.add_argument("--input", "-i", nargs="+", default=[], metavar="IMAGE|STORE",
                   help="CT images (NIfTI, NRRD, MHA, DICOM folder), folders or globs of them, "
                        ".txt/.csv lists, or a prepared store; "
                        "default: the sample chest CT of the slicerio package")
    f.add_argument("--mode", choices=("boxes", "grid"),
                   help="fusion mode (default: fusion.mode of the config)")
    f.add_argument("--samples", type=int, default=4, help="samples, one column each (default 4)")
    f.add_argument("--seed", type=int, default=0, help="seed of the crops and the fusion (default 0)")
    add_config_args(f)
    f.set_defaults(func=run_fusion)


def _volumes(inputs: list[str]):
    """``[(name, array-like (z, y, x) HU, body box ((z0, z1), (y0, y1), (x0, x1)))]``; store cases are
    read lazily, crop by crop. Inputs that are not stores name images as every other command takes
    them (files, folders, globs, lists: :func:`volumefusion.data.datasets.discover_inputs`). Images that cannot
    be read are skipped with a warning naming them; an error if nothing is left."""
    from pathlib import Path

    from volumefusion import VolumeFusionError
    from volumefusion.data.datasets import case_id_from_path, discover_inputs
    from volumefusion.data.samples import chest_ct
    from volumefusion.data.store import Store
    from volumefusion.io import read_image
    from volumefusion.log import get_logger
    from volumefusion.preprocess import BODY_THRESHOLD_HU, body_box

    volumes, images = [], []
    for item in inputs or [str(chest_ct()[0])]:
        if (Path(item) / "store.json").is_file():
            store = Store.open(item)
            volumes += [(i, store.image(i), store.info(i).body_box) for i in store.ids]
        else:
            images.append(item)
    failures: list[tuple[str, str]] = []
    for path in discover_inputs(images, failures) if images else []:
        try:
            array, _ = read_image(path)
        except VolumeFusionError as exc:
            failures.append((str(path), str(exc)))
            continue
        volumes.append((case_id_from_path(path), array, body_box(array, BODY_THRESHOLD_HU)))
    for _, reason in failures:
        get_logger(__name__).warning("skipped %s", reason)
    if not volumes:
        raise VolumeFusionError(f"no readable image among the inputs ({len(failures)} skipped: "
                                + "; ".join(reason for _, reason in failures[:3]) + ")")
    return volumes


def _crop(rng, array, box, size):
    """A crop of ``size`` with its start uniform over the body ``box`` (clamped into the array)."""
    import numpy as np

    start = []
    for (low, high), length, s in zip(box, array.shape, size):
        first = rng.integers(low, max(low, high - s) + 1)
        start.append(int(np.clip(first, 0, length - s)))
    z, y, x = start
    return np.asarray(array[z:z + size[0], y:y + size[1], x:x + size[2]], dtype=np.float32)


def run_fusion(args) -> int:
    import dataclasses

    import numpy as np
    import torch

    from volumefusion import VolumeFusionError, config
    from volumefusion.files import check_writable_file
    from volumefusion.fusion import fuse, fusion_pair, source_shape, uses_views
    from volumefusion.log import get_logger
    from volumefusion.preprocess import normalise_hu
    from volumefusion.viz import save_montage

    log = get_logger(__name__)
    cfg = config.load(args.config, args.overrides)
    fusion = dataclasses.replace(cfg.fusion, mode=args.mode or cfg.fusion.mode)
    if args.samples < 1:
        raise VolumeFusionError(f"--samples {args.samples}: need at least 1")
    if not args.out.lower().endswith(".png"):
        raise VolumeFusionError(f"--out {args.out}: the picture is a PNG; name it NAME.png")
    check_writable_file(args.out, "--out")
    volumes = _volumes(args.input)
    smallest = np.min([v[1].shape for v in volumes], axis=0).tolist()
    # At most 3/4 of the smallest volume, so that two crops of one volume differ.
    crop = tuple(int(min(c, max(1, s * 3 // 4))) for c, s in zip(cfg.data.crop_size, smallest))
    if crop != tuple(cfg.data.crop_size):
        log.info("crop %s reduced to %s for volumes of %s", list(cfg.data.crop_size), list(crop),
                 list(smallest))
    source = tuple(int(min(c, s)) for c, s in zip(source_shape(crop, fusion), smallest))

    rng = np.random.default_rng(args.seed)
    pairs = []
    for _ in range(args.samples):
        b = int(rng.integers(len(volumes)))
        f = b  # grid mode: two views of one case
        if fusion.mode == "boxes" and len(volumes) > 1:
            f = (b + int(rng.integers(1, len(volumes)))) % len(volumes)
        pairs.append([_crop(rng, volumes[i][1], volumes[i][2], source) for i in (b, f)])
    background, foreground = (normalise_hu(torch.from_numpy(np.stack([p[j] for p in pairs]))[:, None],
                                           cfg.data.hu_window) for j in (0, 1))
    generator = torch.Generator().manual_seed(args.seed)
    background, foreground = fusion_pair(background, foreground, fusion, generator,
                                         out_shape=crop if uses_views(fusion) else None)
    fused, labels = fuse(background, foreground, fusion, generator)

    k = fusion.num_classes - 1
    mid = crop[0] // 2
    rows = [("background B", background[:, 0, mid]), ("foreground F", foreground[:, 0, mid]),
            ("fused input X", fused[:, 0, mid])]
    rows = [(title, list(images), "image") for title, images in rows]
    rows.append(("class map y", list(labels[:, mid]), "label"))
    names = [f"{i}: alpha={i}/{k}" for i in range(k + 1)]
    names[0], names[-1] = "0: B (alpha=0)", f"{k}: F (alpha=1)"
    path = save_montage(
        args.out, rows, window=(-1.0, 1.0), label_names=names,
        col_titles=[f"sample {i + 1}" for i in range(args.samples)],
        title=f"Volume Fusion ({fusion.mode}): X = alpha F + (1 - alpha) B, alpha = y / {k}",
    )
    print(path)
    return 0
