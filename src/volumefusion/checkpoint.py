"""Self-describing checkpoints: written atomically, read without unpickling code, recognised in one place.

A checkpoint volumefusion writes is a dict:
  ``model``        plain state dict (no ``module.`` / ``_orig_mod.`` prefixes)
  ``config``       the full resolved :class:`~volumefusion.config.Config` as a dict
  ``task``         ``{"kind": "pretrain" | "segmentation", "num_classes": int,
                     "label_names": {str(int): str} | None, "preprocessing": dict}``
                   where ``preprocessing`` is the store's preparation settings (target spacing,
                   orientation, body crop) that predict must apply to new images
  ``optimizer``, ``scheduler``, ``scaler``  state dicts (absent in exported weights)
  ``step``         optimiser steps done
  ``rng``          RNG states for exact resume
  ``extra``        anything else the engine needs to resume (data position, best metric)
  ``version``      volumefusion version that wrote it

:func:`read_checkpoint` is the one reader: every command and API call that takes a checkpoint opens it
through it, once, and gets a :class:`Checkpoint` that says what it is. It takes

- a ``.pt`` file: ours, an official MIS-FM / PyMIC one (``{"model_state_dict": ...}``), or a plain
  state dict (bare or as ``{"state_dict": ...}``), loaded with ``weights_only=True``, never unpickled;
- a ``.safetensors`` file: an export of ``volumefusion convert --safetensors`` (config and class count
  in its metadata), or tensors alone;
- ``builtin:NAME``: weights shipped with the package (docs/weights.md);
- a dict already loaded, or a :class:`Checkpoint` (returned as it is).

Anything else, a damaged file, or stored data of the wrong type is a :class:`VolumeFusionError` that
names the file and says what it is. What each caller then needs (a config, a task, a MIS-FM layout) it
checks on the :class:`Checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from volumefusion import VolumeFusionError, __version__
from volumefusion.files import atomic_path, atomic_write_bytes
from volumefusion.io import sniff_image_format
from volumefusion.nets.misfm import is_misfm_state, misfm_num_classes, model_config_from_misfm

BUILTIN = Path(__file__).parent / "nets" / "builtin"
"""Weights shipped with the package, named ``builtin:NAME`` (``BUILTIN/NAME.pt``; docs/weights.md)."""

CHECKPOINT_KINDS = ("a checkpoint written by volumefusion (pretrain, finetune or convert) or a MIS-FM / PyMIC "
                    "PCT-Net checkpoint (.pt)")
"""What a command that takes any checkpoint expects, for error messages."""

LAYOUTS = ("volumefusion", "misfm", "state_dict")
"""What a checkpoint holds: a network with its config (ours: ``.pt`` or a safetensors export with our
metadata), an official MIS-FM / PyMIC PCT-Net, or tensors alone."""


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    floats = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()  # one synchronisation
    return [k for (k, _), ok in zip(floats, finite) if not ok]


def check_finite_weights(state: dict[str, torch.Tensor], source: str | Path, action: str = "") -> None:
    """VolumeFusionError naming ``source`` when weights in ``state`` are NaN or infinite (a run that
    diverged): a network loaded from them predicts nothing, and fine-tuning from them learns nothing.
    ``action``: what the caller does about it, appended to the message (default: retrain advice)."""
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:3]) + (f", ... {len(bad) - 3} more" if len(bad) > 3 else "")
        raise VolumeFusionError(
            f"{source}: {len(bad)} of {len(state)} weight tensors hold NaN or infinite values ({shown}); "
            + (action or "the training run that wrote them diverged: use an earlier checkpoint of it, or "
               "train again with a lower optim.lr"))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Serialise ``payload`` to memory, then write it atomically (a killed run leaves no half file)."""
    payload = dict(payload, version=__version__)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# which file


def builtin_weights() -> list[str]:
    """Names of the weights shipped with the package (usable as ``builtin:NAME``)."""
    return sorted(p.stem for p in BUILTIN.glob("*.pt"))


def resolve_weights(source: str | Path) -> Path:
    """The checkpoint file ``source`` names: ``builtin:NAME`` is a checkpoint shipped with the package
    (:func:`builtin_weights`), anything else a path. VolumeFusionError for an unknown built-in name, a
    folder (naming a checkpoint inside it when there is one) or a missing file."""
    text = str(source)
    if text.startswith("builtin:"):
        path = BUILTIN / f"{text.removeprefix('builtin:')}.pt"
        if not path.is_file():
            raise VolumeFusionError(f"{text}: no such built-in weights; available: "
                                    f"{', '.join('builtin:' + n for n in builtin_weights()) or 'none'}")
        return path
    path = Path(source)
    if path.is_dir():
        found = next((p for p in (path / "checkpoints" / "best.pt", path / "checkpoints" / "latest.pt",
                                  path / "best.pt", path / "latest.pt") if p.is_file()), None)
        hint = f", e.g. {found}" if found else ""
        raise VolumeFusionError(f"{path}: is a folder; give a checkpoint file{hint}")
    if not path.is_file():
        raise VolumeFusionError(f"{path}: checkpoint file not found")
    return path


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[IO[bytes]]:
    """``path`` open for reading; VolumeFusionError naming it when the system refuses."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise VolumeFusionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        yield f


def _describe(f: IO[bytes], size: int) -> str:
    """What an open file is, from its first bytes (the file is left at its start)."""
    head = f.read(4096)
    try:
        if not head:
            return "an empty file (0 bytes)"
        if head.startswith(b"PK\x03\x04"):
            try:
                f.seek(0)
                with zipfile.ZipFile(f) as archive:
                    names = archive.namelist()
            except (zipfile.BadZipFile, OSError, EOFError):
                return "a truncated or damaged zip archive (a torch checkpoint cut short?)"
            if any(n.endswith("/data.pkl") for n in names):
                return "a torch checkpoint archive"
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f"a zip archive of {len(names)} file(s) ({shown}), not a torch checkpoint"
        if head.startswith(b"\x1f\x8b"):
            try:
                f.seek(0)
                with gzip.GzipFile(fileobj=f) as unzipped:
                    inner = unzipped.read(4096)
            except (OSError, EOFError, zlib.error):
                inner = b""
            kind = sniff_image_format(inner)
            return f"a gzip-compressed image file ({kind})" if kind else "gzip-compressed data"
        kind = sniff_image_format(head)
        if kind:
            return f"an image file ({kind})"
        header_size = int.from_bytes(head[:8], "little")
        if len(head) > 9 and head[8:9] == b"{" and 2 <= header_size <= size - 8:
            return "a safetensors weights file (tensors without a config)"
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            return "an HDF5 file"
        if head[0] == 0x80 and 2 <= head[1] <= 5:
            return "a Python pickle"
        text = head.decode("utf-8", errors="replace")
        if all(c.isprintable() or c.isspace() for c in text):
            return "a text file"
        return "binary data of no format volumefusion knows"
    finally:
        f.seek(0)


def describe_file(path: str | Path) -> str:
    """What a file is, from its first bytes, for a message about a file that is not a loadable checkpoint:
    ``"a NIfTI image"``, ``"a safetensors weights file"``, ``"random-looking binary data"``..."""
    path = Path(path)
    with _opened(path) as f:
        return _describe(f, path.stat().st_size)


# --------------------------------------------------------------------------------------------------
# reading the bytes


def _unsafe_globals(message: str) -> list[str]:
    """The Python objects a weights-only load refused, from torch's message."""
    return sorted(set(re.findall(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)))


def _check_archive(f: IO[bytes], path: Path, expected: str) -> None:
    """Every member of a torch checkpoint archive against the CRC-32 the zip stores for it (torch.load
    does not check them): one changed byte in a weight tensor is a damaged file, never different
    weights. Reads the whole file once; the file is left at its start."""
    try:
        with zipfile.ZipFile(f) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        bad = f"its archive ({exc})"
    finally:
        f.seek(0)
    if bad:
        raise VolumeFusionError(f"{path}: damaged: the bytes of {bad} inside it do not match the checksum stored "
                                f"with them (changed on disk or in a copy); copy it again; expected {expected}")


def _torch_load(f: IO[bytes], path: Path, what: str, expected: str, map_location) -> Any:
    """``torch.load(f, weights_only=True)`` after checking an archive's checksums; errors name the file and
    never suggest an unsafe load."""
    if what == "a torch checkpoint archive":
        _check_archive(f, path, expected)
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files not written by torch.save; the error
            # below says what matters
            warnings.simplefilter("ignore")
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        refused = _unsafe_globals(str(exc))
        if refused:
            problem = (f"holds Python objects other than tensors and plain data ({', '.join(refused[:3])}), "
                       "which volumefusion never unpickles (unpickling can run code); save the weights as a "
                       "plain dict of tensors")
        elif what == "a Python pickle":
            problem = ("a Python pickle that is not a torch checkpoint, or holds objects other than tensors "
                       "and plain data, which volumefusion never unpickles (unpickling can run code)")
        elif what == "a torch checkpoint archive":  # its checksums held: intact, but not tensors and plain data
            detail = next((line for line in str(exc).splitlines()[1:] if line.strip()), str(exc)).strip()
            problem = (f"a torch checkpoint whose contents volumefusion does not load ({detail[:200]}); it loads only "
                       "tensors and plain data, never other Python objects (unpickling can run code)")
        else:
            problem = "a torch checkpoint that cannot be read (truncated or damaged; copy it again)"
        raise VolumeFusionError(f"{path}: {problem}; expected {expected}") from None


def _safetensors_load(data: bytes, path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file's bytes; errors say what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    def damaged(problem: str) -> VolumeFusionError:
        return VolumeFusionError(f"{path}: not a readable safetensors file ({problem}); expected {expected}")

    if len(data) < 8:
        raise damaged(f"{len(data)} bytes, shorter than the 8-byte header size")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise damaged(f"its header claims {size} bytes, the file has {len(data) - 8} after the size")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise damaged(f"truncated or damaged: {exc}") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise damaged("its __metadata__ is not a mapping")
    return tensors, metadata


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expected: str = CHECKPOINT_KINDS) -> Any:
    """The object a ``.pt`` checkpoint file holds, loaded with ``weights_only=True``; errors name the
    file, say what it is and what the command ``expected`` (never suggesting an unsafe load).
    Most callers want :func:`read_checkpoint`, which also says what the object is."""
    path = resolve_weights(Path(path))
    with _opened(path) as f:
        what = _describe(f, path.stat().st_size)
        if what.startswith("a safetensors"):
            raise VolumeFusionError(f"{path}: {what}, an export for other tools; expected {expected}")
        if what not in ("a torch checkpoint archive", "a Python pickle"):
            raise VolumeFusionError(f"{path}: {what}; expected {expected}")
        return _torch_load(f, path, what, expected, map_location)


# --------------------------------------------------------------------------------------------------
# what it holds


class Checkpoint:
    """What :func:`read_checkpoint` found.

    ``source``: how messages name it (the path or ``builtin:NAME`` as given); ``path``: the file read
    (None for a dict); ``file_format``: ``"torch"``, ``"safetensors"`` or ``"memory"``; ``layout``: one of
    :data:`LAYOUTS`; ``kind``: what it is in words, for messages; ``state``: the weights, without
    wrapper prefixes; ``config`` (plain data, as stored; MIS-FM: ``{"model": ...}`` read from the
    weights; tensors alone: ``{}``) and ``task`` (``{}`` when not stored); ``payload``: everything else
    the file holds (``step``, ``card``, ``optimizer``, ``rng``, ...; a safetensors file's metadata).
    """

    def __init__(self, source: str, layout: str, kind: str, state: dict[str, torch.Tensor], *,
                 config: dict[str, Any] | None = None, task: dict[str, Any] | None = None,
                 payload: dict[str, Any] | None = None, path: Path | None = None, file_format: str = "memory"):
        self.source, self.layout, self.kind, self.state = source, layout, kind, state
        self.payload, self.path, self.file_format = payload or {}, path, file_format
        self._config, self._task = config or {}, task or {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {self.layout}, {len(self.state)} tensors)"

    def error(self, problem: str) -> VolumeFusionError:
        """A VolumeFusionError naming this checkpoint: ``"SOURCE: problem"``."""
        return VolumeFusionError(f"{self.source}: {problem}")

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        if self.layout != "misfm":
            return self._config
        try:
            return {"model": model_config_from_misfm(self.state)}
        except VolumeFusionError as exc:
            raise self.error(str(exc)) from None

    @functools.cached_property
    def task(self) -> dict[str, Any]:
        if self.layout != "misfm":
            return self._task
        try:
            classes = int(misfm_num_classes(self.state))
        except VolumeFusionError as exc:
            raise self.error(str(exc)) from None
        return {"kind": "pretrain", "num_classes": classes, "label_names": None, "preprocessing": {}}

    @property
    def num_classes(self) -> int | None:
        """Output classes of the stored network, when the checkpoint says (a whole number >= 1)."""
        return self.task.get("num_classes")

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preparation settings images must go through for this network (``{}``: none recorded)."""
        return self.task.get("preprocessing") or {}

    def run_config(self):
        """The stored config as a validated :class:`~volumefusion.config.Config`; an invalid one is an
        error naming this checkpoint."""
        from volumefusion.config import ConfigError, from_dict

        try:
            return from_dict(self.config)
        except ConfigError as exc:
            raise self.error(f"its config is not valid: {exc}") from None

    @property
    def step(self) -> int | None:
        """Optimiser steps the weights were trained for, when recorded."""
        step = self.payload.get("step", self.payload.get("iteration"))
        return int(step) if isinstance(step, int) else None

    @property
    def card(self) -> dict[str, Any]:
        """What exported weights say about themselves (data, command, scores; :func:`write_weights`)."""
        card = self.payload.get("card")
        return dict(card) if isinstance(card, dict) else {}

    def training_state(self) -> TrainingState | None:
        """The optimiser, schedule, step, RNG and engine state of a training checkpoint; None for
        weights alone (exported, converted, MIS-FM, a state dict)."""
        p = self.payload
        if self.layout != "volumefusion" or not self.config or not isinstance(p.get("optimizer"), dict):
            return None
        return TrainingState(p["optimizer"], p.get("scheduler") or {}, int(p.get("step") or 0), p.get("rng") or {},
                             dict(p.get("extra") or {}))

    def require(self, needs: str, *fields: str) -> None:
        """An error naming this checkpoint unless it is ours (layout ``volumefusion``) and holds ``fields``
        (``"config"``, ``"task"``, ``"num_classes"``); ``needs`` says for what, e.g. ``"predict needs a
        model trained with `volumefusion finetune`"``."""
        if self.layout != "volumefusion":
            raise self.error(f"{self.kind}, not a volumefusion checkpoint; {needs}")
        missing = [f if f != "num_classes" else "task.num_classes" for f in fields
                   if not (self.num_classes if f == "num_classes" else getattr(self, f))]
        if missing:
            raise self.error(f"not a volumefusion checkpoint (no {', '.join(missing)}); {needs}")


def _mapping(value: Any, what: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise VolumeFusionError(f"{source}: its {what} is a {type(value).__name__} ({str(value)[:40]!r}), not a "
                                "mapping; the checkpoint is damaged or was not written by volumefusion")
    return value


def _task(task: Any, source: str) -> dict[str, Any]:
    task = _mapping(task, "task", source)
    classes = task.get("num_classes")
    if classes is not None:
        if isinstance(classes, bool) or not isinstance(classes, (int, str)) or not str(classes).isdigit() \
                or int(classes) < 1:
            raise VolumeFusionError(f"{source}: its task.num_classes is {classes!r}, not a whole number >= 1")
        task = {**task, "num_classes": int(classes)}
    return task


def _from_metadata(metadata: dict[str, str], source: str) -> tuple[dict, dict]:
    """(config, task) a safetensors export of ``volumefusion convert`` records in its metadata."""
    fields = {}
    for key in ("config", "task"):
        if key in metadata:
            try:
                fields[key] = json.loads(metadata[key])
            except ValueError:
                raise VolumeFusionError(f"{source}: its metadata {key} is not JSON ({metadata[key][:40]!r}); "
                                        "export it again with `volumefusion convert --safetensors`") from None
    task = dict(fields.get("task") or {})
    if "num_classes" in metadata:
        task["num_classes"] = metadata["num_classes"]
    return _mapping(fields.get("config"), "metadata config", source), _task(task, source)


def read_checkpoint(source: str | Path | dict | Checkpoint, expected: str = CHECKPOINT_KINDS) -> Checkpoint:
    """Open a checkpoint of any supported kind (module docstring) once and say what it is.

    ``expected``: what the caller takes, for the message about a file that is no checkpoint at all.
    Raises :class:`VolumeFusionError` naming the file for missing, foreign, damaged or ill-typed ones.
    """
    if isinstance(source, Checkpoint):
        return source
    path, file_format, metadata = None, "memory", {}
    if isinstance(source, dict):
        name, payload = "the given state dict", source
    else:
        name, path = str(source), resolve_weights(source)
        with _opened(path) as f:
            what = _describe(f, path.stat().st_size)
            if what.startswith("a safetensors") or (path.suffix == ".safetensors" and what.startswith("binary")):
                file_format = "safetensors"
                payload, metadata = _safetensors_load(f.read(), path, expected)
            elif what in ("a torch checkpoint archive", "a Python pickle"):
                file_format = "torch"
                payload = _torch_load(f, path, what, expected, "cpu")
            else:
                raise VolumeFusionError(f"{path}: {what}; expected {expected}")
    if not isinstance(payload, dict):
        raise VolumeFusionError(f"{name}: holds a {type(payload).__name__}, not a checkpoint (a dict of "
                                f"weights and settings); expected {expected}")

    config, task, rest = {}, {}, {}
    if file_format == "safetensors":
        state = payload
        config, task = _from_metadata(metadata, name)
        rest = dict(metadata)
    elif isinstance(payload.get("model"), dict):
        state = payload["model"]
        config, task = _mapping(payload.get("config"), "config", name), _task(payload.get("task"), name)
        rest = {k: v for k, v in payload.items() if k not in ("model", "config", "task")}
    else:
        wrapper = next((k for k in ("model_state_dict", "state_dict") if isinstance(payload.get(k), dict)), None)
        state = payload[wrapper] if wrapper else payload
        rest = {k: v for k, v in payload.items() if k != wrapper} if wrapper else {}
    if not all(isinstance(v, torch.Tensor) for v in state.values()) or (not state and "model" not in payload):
        keys = ", ".join(list(map(str, payload))[:6])
        raise VolumeFusionError(
            f"{name}: no model weights found (top-level keys: {keys}); expected a volumefusion checkpoint, "
            "a MIS-FM/PyMIC checkpoint ({'model_state_dict': ...}) or a plain state dict")
    state = clean_state_dict(state)
    check_finite_weights(state, name)  # a diverged run's weights are refused by every loader

    if file_format == "safetensors" and config:
        layout, kind = "volumefusion", "a volumefusion safetensors export"
    elif file_format == "safetensors":
        layout, kind = "state_dict", "a safetensors weights file (tensors without a config)"
    elif "model" in payload and isinstance(payload["model"], dict):
        layout, kind = "volumefusion", "a volumefusion checkpoint"
    else:
        layout, kind = "state_dict", "a plain state dict (tensors without a config)"
        if "model_state_dict" in payload:
            kind = "a PyMIC checkpoint of a network other than PCT-Net"
    if layout == "state_dict" and is_misfm_state(state):
        layout, kind = "misfm", "an official MIS-FM / PyMIC PCT-Net checkpoint"
    return Checkpoint(name, layout, kind, state, config=config, task=task, payload=rest, path=path,
                      file_format=file_format)


def export_weights(checkpoint: str | Path | Checkpoint, out: str | Path, card: dict[str, Any] | None = None,
                   dtype: torch.dtype = torch.float16) -> Path:
    """A small weights file from a training checkpoint: model (floating tensors stored as ``dtype``;
    loading copies them into the network's float32 parameters), config, task and step, plus ``card``
    (what the weights are: data, command, pretext scores; shown by the demo report). Optimiser, RNG
    and resume state are left out. Returns ``out``."""
    ckpt = read_checkpoint(checkpoint)
    ckpt.require("export_weights takes a volumefusion training checkpoint", "config", "task")
    model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state.items()}
    return write_weights(out, model, ckpt.config, ckpt.task, step=ckpt.step, card=card)


def write_weights(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any], task: dict[str, Any],
                  *, step: int | None = None, card: dict[str, Any] | None = None) -> Path:
    """Weights without training state (the layout of ``builtin:NAME``): the network's ``state``
    (prefixes removed), its ``config`` and ``task`` as plain data, the optimiser ``step`` it was taken
    at, and ``card``: what the weights are, in words. Written atomically; returns ``path``."""
    save_checkpoint(path, {"model": clean_state_dict(state), "config": config, "task": task, "step": step,
                           "card": dict(card or {})})
    return Path(path)


@dataclass
class TrainingState:
    """What a training checkpoint holds besides the network, to resume exactly: optimiser and schedule
    state dicts, optimiser steps done, the global RNG states (``{"torch": ..., "cuda": [...]}``) and the
    engine's ``extra`` (best score, world size, data fingerprint)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    step: int
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def write_training(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any], task: dict[str, Any],
                   training: TrainingState) -> Path:
    """A training checkpoint (``latest.pt``, ``best.pt``, ``step_*.pt``): the network's ``state``, its
    ``config`` and ``task`` as plain data, and ``training`` to resume from. Refused (VolumeFusionError)
    when a weight is not finite; written atomically. Returns ``path``."""
    state = clean_state_dict(state)
    check_finite_weights(state, f"step {training.step}", action=f"{path} not written; the run diverged (lower "
                         "optim.lr, or set optim.grad_clip)")
    save_checkpoint(path, {"model": state, "config": config, "task": task, "optimizer": training.optimizer,
                           "scheduler": training.scheduler, "scaler": None, "step": training.step,
                           "rng": training.rng, "extra": training.extra})
    return Path(path)


def write_safetensors(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                      task: dict[str, Any]) -> Path:
    """The network as safetensors for other tools, with ``config``, ``task`` and ``num_classes`` as JSON in
    its metadata (what :func:`read_checkpoint` reads back); written atomically. Returns ``path``."""
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(config), "task": json.dumps(task), "num_classes": str(task["num_classes"])}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in clean_state_dict(state).items()}, str(tmp), metadata=metadata)
    return Path(path)
