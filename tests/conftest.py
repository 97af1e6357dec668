"""Shared fixtures: tiny stores of phantom CT and a tiny network configuration."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

# Reference checkpoint data beside the checkout (../shared/conformance); tests that need it skip without it.
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"

# Small, fast PCT-Net: divisible crops of [16, 32, 32] reach 2x2x2 at the bottom.
TINY_MODEL = [
    "model.feature_channels=[4,8,16,32,64]",
    "model.num_heads=[2,4,8]",
    "model.window_size=2",
    "data.crop_size=[16,32,32]",
    "data.workers=0",
    "run.batch_size=2",
    "run.device=cpu",
    "run.log_every=1",
    "run.val_samples=4",
]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory):
    """A store of three unlabelled [24, 48, 48] phantoms."""
    from volumefusion.data.phantoms import write_phantoms
    from volumefusion.data.prepare import prepare
    from volumefusion.preprocess import PrepareSettings

    root = tmp_path_factory.mktemp("phantoms")
    files = write_phantoms(root / "raw", seeds=[1, 2, 3], shape=(24, 48, 48), with_labels=False)
    summary = prepare([str(p) for p in files], root / "store", PrepareSettings())
    assert not summary.failed
    return root / "store"


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """An MSD-style labelled dataset of four [24, 48, 48] phantoms."""
    from volumefusion.data.phantoms import write_msd_dataset

    root = tmp_path_factory.mktemp("msd")
    return write_msd_dataset(root / "Task01_Phantom", seeds=[11, 12, 13, 14], shape=(24, 48, 48))


@pytest.fixture
def unwritable_folder(tmp_path):
    """An existing folder in which no file can be created, also for root (who ignores permission bits:
    there, sysfs, which refuses new files to everyone)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys/fs")
    try:
        os.close(os.open(folder / "volumefusion_probe", os.O_CREAT | os.O_WRONLY))
    except OSError:
        yield folder
        return
    pytest.skip("no unwritable folder on this machine for root")


class _RunsCode:
    """What a malicious checkpoint holds: unpickling it would run a command."""

    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def write_bad_checkpoints(folder):
    """Files given where a checkpoint is expected, the shared catalogue of bad checkpoints:
    ``{name: (path, phrase the error must contain)}``."""
    import pickle
    import zipfile

    import numpy as np
    from safetensors.torch import save_file

    from volumefusion.checkpoint import save_checkpoint
    from volumefusion.io import Geometry, write_image

    folder.mkdir(exist_ok=True)
    files = {}
    files["random"] = (folder / "random.pt", "binary data of no format")
    files["random"][0].write_bytes(bytes(range(7, 256)) * 8)
    files["nifti"] = (folder / "ct.nii.gz", "image file (NIfTI)")
    write_image(folder / "ct.nii.gz", np.zeros((4, 4, 4), np.int16), Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0)))
    files["zip"] = (folder / "archive.pt", "zip archive of 1 file(s) (notes.txt), not a torch checkpoint")
    with zipfile.ZipFile(files["zip"][0], "w") as archive:
        archive.writestr("notes.txt", "hello")
    files["safetensors"] = (folder / "weights.safetensors", "safetensors weights file")
    save_file({"w": torch.zeros(2)}, str(files["safetensors"][0]))
    files["pickle"] = (folder / "raw.pt", "Python pickle")
    files["pickle"][0].write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=4))
    files["numpy"] = (folder / "numpy.pt", "numpy")
    files["malicious"] = (folder / "evil.pt", "never unpickles")  # and never called damaged
    torch.save({"model": {"w": torch.zeros(2)}, "run": _RunsCode()}, files["malicious"][0])
    torch.save({"model": {"w": np.zeros(2)}}, files["numpy"][0])
    files["truncated"] = (folder / "cut.pt", "truncated or damaged")
    save_checkpoint(files["truncated"][0], {"model": torch.nn.Linear(40, 40).state_dict()})
    files["truncated"][0].write_bytes(files["truncated"][0].read_bytes()[:1000])
    files["flipped"] = (folder / "flipped.pt", "damaged: the bytes of")
    save_checkpoint(files["flipped"][0], {"model": {"w": torch.linspace(1, 2, 1000)}})
    data = bytearray(files["flipped"][0].read_bytes())
    at = data.index(torch.linspace(1, 2, 1000)[500:501].numpy().tobytes())  # one weight's 4 bytes
    data[at:at + 4] = torch.tensor([7.0]).numpy().tobytes()
    files["flipped"][0].write_bytes(bytes(data))
    files["empty"] = (folder / "empty.pt", "an empty file (0 bytes)")
    files["empty"][0].write_bytes(b"")
    return files


def write_ct_plans(path: Path) -> Path:
    """A minimal nnU-Net plans file of one CT channel, as `export nnunet` reads it (no nnU-Net needed)."""
    import json

    arch = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}
    path.write_text(json.dumps({
        "plans_name": "nnUNetPlans", "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0}},
        "configurations": {"3d_fullres": {"patch_size": [16, 48, 48], "spacing": [10.0, 7.5, 7.5],
                                          "architecture": arch, "normalization_schemes": ["CTNormalization"]}}}))
    return path


@pytest.fixture
def count_reads(monkeypatch):
    """``count_reads(path)`` -> ``{"opened": n, "loaded": n}``, updated as the test goes on: how often
    ``path`` is opened (by Python's ``open``, or by ``torch.load`` or safetensors given the path itself)
    and how often ``torch.load`` deserialises it."""
    import builtins
    import io

    import safetensors
    import safetensors.torch

    watched: dict[Path, dict[str, int]] = {}

    def key(file) -> Path | None:
        name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", None)
        return Path(name).resolve() if isinstance(name, (str, os.PathLike)) else None

    def counting(real, loads: bool):
        def call(file, *args, **kwargs):
            counts = watched.get(key(file))
            if counts is not None:
                counts["opened"] += not loads or isinstance(file, (str, os.PathLike))
                counts["loaded"] += loads
            return real(file, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", counting(builtins.open, loads=False))
    monkeypatch.setattr(io, "open", counting(io.open, loads=False))
    monkeypatch.setattr(torch, "load", counting(torch.load, loads=True))
    monkeypatch.setattr(safetensors, "safe_open", counting(safetensors.safe_open, loads=False))
    monkeypatch.setattr(safetensors.torch, "load_file", counting(safetensors.torch.load_file, loads=False))

    def watch(path) -> dict[str, int]:
        return watched.setdefault(Path(path).resolve(), {"opened": 0, "loaded": 0})

    return watch


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 400 KiB (tmpfs), where a CT case does not fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
