"""The Python API: what a script or notebook needs, in one place (also importable from ``volumefusion``).

Each call does what one CLI command does, with the same files and settings, and returns objects
instead of printing. Arrays are NumPy, ``(z, y, x)``; CT in Hounsfield units; spacings in mm,
``(z, y, x)``; label maps hold class indices (0 = background). Errors caused by the input are
:class:`~volumefusion.VolumeFusionError` with a message that names the file or field.

Example (see ``docs/python-api.md`` for more)::

    import volumefusion as vf

    vf.prepare_collection(["ct/"], "store/")
    vf.pretrain("store/", "runs/vf", overrides=["run.max_steps=1000"])
    vf.finetune("Task09_Spleen/", "runs/spleen", pretrained="runs/vf/checkpoints/latest.pt")
    predictor = vf.load_predictor("runs/spleen/checkpoints/best.pt")
    labels = vf.predict_array(predictor, ct_hu, spacing_zyx=(2.5, 0.8, 0.8))
    print(vf.dice_per_class(labels, reference, predictor.label_names))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from volumefusion import VolumeFusionError, config
from volumefusion.config import Config
from volumefusion.data.prepare import PrepareSummary, prepare
from volumefusion.evaluate import evaluate_folders
from volumefusion.geometry import Geometry
from volumefusion.infer import Predictor, PredictSummary, predict_files
from volumefusion.metrics import evaluate_case
from volumefusion.preprocess import PrepareSettings, check_spacing
from volumefusion.train import probe as probes
from volumefusion.train import runs
from volumefusion.train.engine import FitResult, RunInterrupted
from volumefusion.train.probe import ProbeResult, probe_hook
from volumefusion.train.runs import FinetuneResult
from volumefusion.weights import model_from_checkpoint

__all__ = [
    "Config", "FinetuneResult", "FitResult", "LoadedModel", "PredictSummary", "PrepareSettings", "PrepareSummary",
    "Predictor", "dice_per_class", "evaluate_arrays", "evaluate_folders", "finetune", "load_config", "load_model",
    "load_predictor", "predict_array", "predict_files", "prepare_collection", "pretrain", "probe", "ProbeResult",
    "RunInterrupted",
]

ConfigSource = str | Path | Sequence[str | Path] | None


def _as_list(value, name: str) -> list:
    """``value`` as a list: one path or string is a list of one (never its letters); None is empty.
    A mapping, or an item that is not a path or string, is a VolumeFusionError naming ``name``."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [value]
    if isinstance(value, Mapping):
        raise VolumeFusionError(f"{name}: a {type(value).__name__}; expected a path or string, or a list of them "
                                "(settings as data go in overrides, as 'section.field=value' strings)")
    try:
        items = list(value)
    except TypeError:
        raise VolumeFusionError(f"{name}: a {type(value).__name__}; expected a path or string, or a list of "
                                "them") from None
    wrong = [v for v in items if not isinstance(v, (str, Path))]
    if wrong:
        raise VolumeFusionError(f"{name}: holds a {type(wrong[0]).__name__} ({wrong[0]!r}); expected paths or strings")
    return items


def _path(value, name: str, optional: bool = False) -> Path | None:
    """``value`` as one path; VolumeFusionError naming the argument for None (unless ``optional``), a
    list, or anything else that is not a path or string."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, Path)) or not str(value):
        raise VolumeFusionError(f"{name}: {value!r}; expected one path (a str or pathlib.Path)")
    return Path(value)


def _numbers(value, name: str, count: int, unit: str) -> tuple[float, ...]:
    """``value`` as ``count`` floats; VolumeFusionError naming the argument ``name`` otherwise."""
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        numbers = None
    if isinstance(value, str) or numbers is None or len(numbers) != count:
        raise VolumeFusionError(f"{name}: {value!r}; expected {count} numbers ({unit})")
    return numbers


def load_config(config_files: ConfigSource = None, overrides: str | Sequence[str] = ()) -> Config:
    """A validated :class:`Config`: the defaults, then each YAML file (or preset name such as
    ``"pretrain_paper"``), then ``overrides`` (``"section.field=value"`` strings, as ``--set``; one
    string is one override).

    Example: ``load_config(overrides=["run.max_steps=100", "run.device=cpu"]).run.max_steps == 100``.
    """
    return config.load(_as_list(config_files, "config_files"), _as_list(overrides, "overrides"))


def prepare_collection(inputs: str | Path | Sequence[str | Path], out: str | Path,
                       settings: PrepareSettings | None = None, *, workers: int = 1,
                       label_dir: str | Path | None = None,
                       label_names: Mapping[int, str] | None = None) -> PrepareSummary:
    """Prepare a collection of CT images (and label maps) into the store ``out``, as ``volumefusion prepare``.

    ``inputs``: one or a list of image files, folders, DICOM series folders, globs, .txt/.csv lists,
    or MSD / nnU-Net v2 dataset folders (with ``dataset.json``). ``settings``: target spacing (mm), orientation and body
    crop (default: native spacing, LPS, cropped to the body). ``label_dir``: label maps named like the
    images; ``label_names``: ``{value: name}`` of their classes. Bad inputs are listed in the returned
    summary's ``failed`` and skipped; cases prepared before are skipped unless their source changed.

    Example: ``prepare_collection(["ct/"], "store/", PrepareSettings(spacing_zyx=(2.0, 1.0, 1.0)))``.
    """
    if settings is not None and not isinstance(settings, PrepareSettings):
        raise VolumeFusionError(f"settings: a {type(settings).__name__}; expected PrepareSettings(...) or None")
    inputs = _as_list(inputs, "inputs")
    if not inputs:
        raise VolumeFusionError("inputs: none given; expected image files, folders or dataset folders")
    return prepare([str(i) for i in inputs], _path(out, "out"), settings, workers=workers,
                   label_dir=_path(label_dir, "label_dir", optional=True),
                   label_names=dict(label_names) if label_names is not None else None)


def pretrain(data: str | Path, out: str | Path, config_files: ConfigSource = None, *,
             overrides: str | Sequence[str] = (), resume: bool | str | Path = False) -> FitResult:
    """Volume Fusion self-supervised pretraining on the store ``data`` (from :func:`prepare_collection`),
    as ``volumefusion pretrain``; the run folder ``out`` gets ``checkpoints/latest.pt``, metrics and plots.

    ``config_files`` / ``overrides`` as in :func:`load_config`. Returns the steps done and the history.
    Ctrl-C or SIGTERM stops it after the current step, writes ``checkpoints/latest.pt`` and raises
    :class:`RunInterrupted` (``resume=True`` continues).

    Example: ``pretrain("store/", "runs/vf", "pretrain_paper", overrides=["run.max_steps=1000"])``.
    """
    cfg = load_config(config_files, overrides)
    data, out = _path(data, "data"), _path(out, "out")
    return _finished(runs.pretrain(cfg, data, out, resume=resume, on_checkpoint=probe_hook(cfg, out)), out)


def finetune(data: str | Path, out: str | Path, pretrained: str | Path | None = None,
             config_files: ConfigSource = None, *, overrides: str | Sequence[str] = (),
             resume: bool | str | Path = False) -> FinetuneResult:
    """Fine-tune a segmentation network on labelled data, as ``volumefusion finetune``.

    ``data``: a store with labels, or anything :func:`prepare_collection` takes with labels (an MSD /
    nnU-Net v2 dataset folder; it is prepared into ``out`` first). ``pretrained``: a volumefusion
    pretraining checkpoint, an official MIS-FM one or ``builtin:NAME`` (it fixes the architecture and
    the HU window); None trains from scratch. The best model is ``out/checkpoints/best.pt`` (for
    :func:`load_predictor`). Returns the run's steps and history, and with ``load_report`` how the
    pretrained weights loaded. Ctrl-C or SIGTERM raises :class:`RunInterrupted` as in :func:`pretrain`.

    Example: ``finetune("Task09_Spleen/", "runs/spleen", "runs/vf/checkpoints/latest.pt")``.
    """
    files = _as_list(config_files, "config_files")
    data, out = _path(data, "data"), _path(out, "out")
    return _finished(runs.finetune([str(f) for f in files], _as_list(overrides, "overrides"), data, out,
                                   _path(pretrained, "pretrained", optional=True), resume=resume), out)


def _finished(result: FitResult, out: str | Path):
    """``result`` of a run that reached its last step; :class:`RunInterrupted` for one a signal stopped, so
    a script does not go on with an unfinished model (the CLI exits with 130 / 143 instead)."""
    if result.interrupted:
        raise RunInterrupted(f"{out}: stopped at step {result.step} by {result.interrupted}; "
                             f"{Path(out) / 'checkpoints' / 'latest.pt'} is written: resume=True continues",
                             result.interrupted)
    return result


def probe(weights: str | Path | Sequence[str | Path] | Mapping[str, str | Path], data: str | Path, out: str | Path,
          config_files: ConfigSource = "finetune", *, overrides: str | Sequence[str] = (),
          steps: int | None = 1000, seeds: Sequence[int] = (0, 1), labelled: int | None = None,
          split_file: str | Path | None = None, finetune: bool = False, device: str = "auto",
          workers: int | None = None) -> ProbeResult:
    """Did pretraining learn features that serve a labelled task? As ``volumefusion probe``: for each
    checkpoint in ``weights`` (a mapping names them) and seed, train only the decoder with the encoder
    frozen, beside a frozen random encoder, and score the held-out cases (the split's validation cases).

    ``data``: a labelled store or dataset folder; ``config_files``/``overrides``: the fine-tuning
    recipe; ``steps``: the budget of every run (None: the recipe's ``run.max_steps``, 20,000 in the
    ``finetune`` preset); ``labelled``: training cases per run, drawn by seed;
    ``finetune``: also every layer trained from the weights, beside scratch. The result's ``table()``
    and ``comparisons()`` give every seed, the means and the paired test; ``out/probe.md`` and
    ``out/probe.json`` hold them too.

    Example: ``vf.probe("runs/vf/checkpoints/latest.pt", "Task09_Spleen/", "probe", labelled=2).table()``.
    """
    named = weights if isinstance(weights, Mapping) else _as_list(weights, "weights")
    files = [str(f) for f in _as_list(config_files, "config_files")]
    return probes.probe(named, _path(data, "data"), _path(out, "out"), config=files,
                        overrides=[*_as_list(overrides, "overrides"), *([f"run.max_steps={steps}"] if steps else [])],
                        seeds=seeds, labelled=labelled,
                        split_file=_path(split_file, "split_file", optional=True), finetune_too=finetune,
                        device=device, workers=workers)


@dataclass
class LoadedModel:
    """A network restored from a checkpoint: ``model`` (eval mode, CPU), its ``config`` and
    ``num_classes`` output channels (Volume Fusion mixing levels for a pretraining checkpoint)."""

    model: nn.Module
    config: Config
    num_classes: int


def load_model(path: str | Path) -> LoadedModel:
    """The network stored in ``path``: a volumefusion checkpoint (``.pt``), an official MIS-FM / PyMIC
    checkpoint (architecture inferred from its weights), a ``.safetensors`` export written by
    ``volumefusion convert --safetensors``, or ``builtin:NAME``. Weights load with ``weights_only``
    semantics (no pickled code).

    Example: ``net = load_model("pctnet_ct10k_volf.pt").model; logits = net(torch.zeros(1, 1, 32, 64, 64))``.
    """
    model, cfg, num_classes = model_from_checkpoint(_path(path, "path"))
    return LoadedModel(model.eval(), cfg, num_classes)


def load_predictor(path: str | Path, device: str | torch.device = "auto", **options) -> Predictor:
    """A :class:`Predictor` for a fine-tuned checkpoint (``out/checkpoints/best.pt`` of :func:`finetune`):
    the network plus the preprocessing it was trained with. ``device``: "auto", "cpu", "cuda" or
    "cuda:N"; ``options``: ``patch_size``, ``overlap``, ``window_batch``, ``tta``, ``precision``."""
    tta = options.get("tta", False)
    if not isinstance(tta, bool) and not (isinstance(tta, Sequence) and not isinstance(tta, str)
                                          and all(isinstance(a, int) and not isinstance(a, bool) for a in tta)):
        raise VolumeFusionError(f"tta: {tta!r}; expected True, False or the axes to mirror (e.g. [0, 1])")
    return Predictor.from_checkpoint(_path(path, "path"), device, **options)


def predict_array(predictor: Predictor, image: np.ndarray, spacing_zyx: Sequence[float], *,
                  origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[float] | None = None,
                  progress: bool = False) -> np.ndarray:
    """Segment one CT volume held in memory.

    ``image``: (z, y, x) HU, any numeric dtype; ``spacing_zyx``: voxel size in mm; ``origin`` (x, y, z
    mm) and ``direction`` (9 floats, ITK order; default identity, i.e. LPS) matter only when the
    checkpoint reorients. Returns the (z, y, x) uint8 label map on the input's grid. NaN or infinite
    voxels, and spacings that are not positive, are refused (VolumeFusionError naming the argument).

    Example: ``labels = predict_array(predictor, ct_hu, spacing_zyx=(2.5, 0.8, 0.8))``.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise VolumeFusionError(f"image has shape {image.shape}; predict_array takes one (z, y, x) volume")
    geometry = Geometry(image.shape, _numbers(spacing_zyx, "spacing_zyx", 3, "mm, z y x"),
                        _numbers(origin, "origin", 3, "mm, x y z"),
                        *(() if direction is None else (_numbers(direction, "direction", 9, "ITK order"),)))
    labels, _ = predictor.predict(image, geometry, progress=progress)
    return labels


def evaluate_arrays(pred: np.ndarray, ref: np.ndarray, labels: Mapping[int, str] | Sequence[int],
                    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
                    tolerance_mm: float = 1.0) -> dict[str, dict[str, float]]:
    """Dice, HD95 (mm), ASSD (mm) and NSD per class of a (z, y, x) label map against the reference.

    ``labels``: ``{value: name}`` (e.g. ``predictor.label_names`` without 0) or values to score.
    Returns ``{name: {"dice", "hd95", "assd", "nsd", "ref_voxels", "pred_voxels"}}``; conventions for
    empty masks as in ``volumefusion evaluate --help``.
    """
    spacing = check_spacing(_numbers(spacing_zyx, "spacing_zyx", 3, "mm, z y x"))
    return evaluate_case(np.asarray(pred), np.asarray(ref), spacing, _foreground(labels), tolerance_mm)


def dice_per_class(pred: np.ndarray, ref: np.ndarray,
                   labels: Mapping[int, str] | Sequence[int]) -> dict[str, float]:
    """``{class name: Dice}`` of a (z, y, x) label map against the reference (1.0 where a class is
    absent from both); background (0) is left out.

    Example: ``dice_per_class(labels, reference, {1: "spleen"})`` -> ``{"spleen": 0.93}``.
    """
    return {name: m["dice"] for name, m in evaluate_arrays(pred, ref, labels).items()}


def _foreground(labels: Mapping[int, str] | Sequence[int]) -> dict[int, str]:
    """``{value: name}`` of the classes to score (0 left out); VolumeFusionError for a string (not its
    letters) or values that are not whole numbers."""
    if isinstance(labels, (str, bytes)):
        raise VolumeFusionError(f"labels: {labels!r}; expected {{value: name}} (e.g. {{1: {labels!r}}}) or a list "
                                "of label values")
    try:
        names = dict(labels) if isinstance(labels, Mapping) else {v: str(v) for v in labels}
        if any(isinstance(v, bool) or int(v) != v for v in names):
            raise ValueError
    except (TypeError, ValueError):
        raise VolumeFusionError(f"labels: {labels!r}; expected {{value: name}} or a list of whole-number label "
                                "values") from None
    return {int(v): str(n) for v, n in names.items() if int(v) != 0}
