"""The crops a store gives its loaders, as digests: a fingerprint to compare two implementations of
the store (see ``test_index.py``). Uses only API that existed before the store's index."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from volumefusion.data.phantoms import write_msd_dataset, write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.data.sampling import PretrainLoader, SegmentationLoader
from volumefusion.data.store import Store
from volumefusion.preprocess import PrepareSettings

SETTINGS = PrepareSettings(crop_to_body=False)


def crops_digest(root: Path) -> dict[str, str]:
    """sha256 of the first batches of the loaders in the configurations training uses, on two small
    phantom stores prepared under ``root``. Uses only API that existed before the index, so the same
    function run against the code before it gives the reference values in ``test_index.py``."""
    raw = write_phantoms(root / "raw", seeds=[1, 2, 3], shape=(24, 48, 48))
    prepare([str(p) for p in raw], root / "plain", SETTINGS)
    prepare([str(write_msd_dataset(root / "msd", seeds=[6, 7, 8], shape=(24, 48, 48)))], root / "labelled", SETTINGS)
    plain, labelled = Store.open(root / "plain"), Store.open(root / "labelled")
    loaders = {
        "pretrain": PretrainLoader(plain, (8, 16, 16), 2, seed=3),
        "pretrain_padded_rank1": PretrainLoader(plain, (32, 40, 56), 2, seed=4, rank=1, world_size=2),
        "pretrain_grid": PretrainLoader(plain, (8, 16, 16), 2, seed=5, same_case=True, start_step=7),
        "finetune": SegmentationLoader(labelled, ["phantom_0008", "phantom_0006"], (8, 16, 16), 3, seed=6,
                                       foreground_ratio=0.5),
    }
    digests = {}
    for name, loader in loaders.items():
        digest = hashlib.sha256()
        for batch in itertools.islice(loader, 5):
            for key in sorted(batch):
                value = batch[key]
                digest.update(value.numpy().tobytes() if hasattr(value, "numpy") else json.dumps(value).encode())
        digests[name] = digest.hexdigest()
    return digests
