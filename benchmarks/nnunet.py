"""Volume Fusion pretraining of nnU-Net's ResEnc-L (``model.name: nnunet``) beside PCT-Net.

The ResEnc-L comes from nnU-Net's own planner (``nnUNetPlannerResEncL``) run on the fingerprint of a
typical abdominal CT collection (100 cases of 120 x 512 x 512 voxels at 2.5 x 0.8 x 0.8 mm; only the
fingerprint, no images): 7 stages, 32 to 320 features, patch [64, 320, 256]. Both networks take the
same bare Volume Fusion training step (:func:`benchmarks.engine.bare_samples_per_s`: normalisation and
fusion on the device, forward, Dice + CE with deep supervision, backward, Adam) at the same crop,
batch and device: [32, 64, 64] x 2 on a CPU, the paper's [64, 128, 128] x 4 (bf16) on a GPU. PCT-Net is
the paper configuration. ``--tiny``: a [32, 64, 64] fingerprint, both networks shrunk.

Needs the extra ``volumefusion[nnunet]``; without it the module raises (the runner reports it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.engine import bare_samples_per_s
from volumefusion import config
from volumefusion.data.phantoms import write_phantoms
from volumefusion.data.prepare import prepare
from volumefusion.data.store import Store
from volumefusion.nets import build_model
from volumefusion.preprocess import PrepareSettings
from volumefusion.train.tasks import PretrainTask

DATASET = "Dataset900_CTFingerprint"
CASES = 100


def plan_resenc_l(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """nnU-Net's ResEnc-L plans for a dataset fingerprint of ``CASES`` CT volumes of ``shape`` voxels at
    ``spacing`` mm; returns the plans file. Runs nnU-Net's planner in this process."""
    raw, pre = root / "nnUNet_raw" / DATASET, root / "nnUNet_preprocessed" / DATASET
    raw.mkdir(parents=True)
    pre.mkdir(parents=True)
    cases = {f"c{i}": {"images": [f"imagesTr/c{i}_0000.nii.gz"], "label": f"labelsTr/c{i}.nii.gz"}
             for i in range(CASES)}
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": CASES,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO", "dataset": cases}))
    intensities = {"max": 3000.0, "mean": 100.0, "median": 100.0, "min": -1000.0, "percentile_00_5": -900.0,
                   "percentile_99_5": 300.0, "std": 150.0}
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "foreground_intensity_properties_per_channel": {"0": intensities},
        "median_relative_size_after_cropping": 1.0, "shapes_after_crop": [list(shape)] * CASES,
        "spacings": [list(spacing)] * CASES}))
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
    try:
        from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
            nnUNetPlannerResEncL,
        )
    except ImportError as exc:
        raise ImportError(f"{exc}: this benchmark needs nnU-Net: pip install 'volumefusion[nnunet]'") from None
    with contextlib.redirect_stdout(sys.stderr):  # the planner reports on stdout, which carries the JSON
        nnUNetPlannerResEncL(DATASET).plan_experiment()
    return pre / "nnUNetResEncUNetLPlans.json"


def _shrink(plans_file: Path) -> None:
    """Tiny: 4 to 32 features, one block per stage."""
    plans = json.loads(plans_file.read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    stages = kwargs["n_stages"]
    kwargs["features_per_stage"] = [min(4 * 2**i, 32) for i in range(stages)]
    kwargs["n_blocks_per_stage"] = [1] * stages
    plans_file.write_text(json.dumps(plans))


def run(tiny: bool = False, device: str = "cpu") -> list[dict]:
    cuda = device.startswith("cuda")
    dev = torch.device("cuda" if cuda else "cpu")
    if tiny:
        fingerprint, crop, batch, steps = ((32, 64, 64), (1.0, 1.0, 1.0)), (32, 64, 64), 2, 2
        pct = ["model.feature_channels=[4,8,16,32,64]", "model.num_heads=[2,4,8]", "model.window_size=2"]
    else:
        fingerprint, crop, batch, steps = ((120, 512, 512), (2.5, 0.8, 0.8)), (32, 64, 64), 2, 3
        pct = []
        if cuda:
            crop, batch, steps = (64, 128, 128), 4, 10
    common = [f"data.crop_size={list(crop)}", f"run.batch_size={batch}", f"run.device={dev.type}", "data.workers=0"]
    environment = {name: os.environ.get(name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            plans_file = plan_resenc_l(tmp, *fingerprint)
            if tiny:
                _shrink(plans_file)
            files = write_phantoms(tmp / "raw", seeds=range(3), shape=(40, 80, 80), with_labels=False)
            prepare([str(f) for f in files], tmp / "store", PrepareSettings())
            store = Store.open(tmp / "store")
            measured = {}
            for name, overrides in (("pctnet", pct), ("resenc_l", ["model.name=nnunet", f"model.plans={plans_file}"])):
                cfg = config.load(overrides=common + overrides)
                task = PretrainTask(cfg, store)
                with torch.device("meta"):
                    params = sum(p.numel() for p in build_model(cfg.model, task.num_classes).parameters())
                measured[name] = (bare_samples_per_s(cfg, task, steps, dev), params)
            patch = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["patch_size"]
    finally:
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    params = {"crop": list(crop), "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
              "resenc_l_params_m": round(measured["resenc_l"][1] / 1e6, 2),
              "pctnet_params_m": round(measured["pctnet"][1] / 1e6, 2), "plans_patch": patch}
    pct_sps, resenc_sps = measured["pctnet"][0], measured["resenc_l"][0]
    base = {"unit": "samples/s", "higher_is_better": True, "device": dev.type, "params": params}
    return [
        {"name": "pctnet_vf_pretrain_samples_per_s", "value": round(pct_sps, 4), "baseline": None,
         "baseline_name": None, "ratio": None, **base},
        {"name": "resenc_l_vf_pretrain_samples_per_s", "value": round(resenc_sps, 4), "baseline": round(pct_sps, 4),
         "baseline_name": "PCT-Net, same step, crop, batch and device", "ratio": round(resenc_sps / pct_sps, 4),
         **base},
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small fingerprint and shrunk networks, seconds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(json.dumps(run(args.tiny, args.device), indent=1))
