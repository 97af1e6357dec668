"""The machinery behind configs: typed, checked dataclasses built from plain data, read from YAML files
(or bundled presets, by name) with ``--set section.field=value`` overrides on top.

It knows no field of any config: :mod:`volumefusion.config` declares the run config with
:func:`setting`, :mod:`volumefusion.demo.settings` the demo's. Each field may carry ``metadata`` with
``choices`` (allowed values) and ``min``/``max`` (inclusive bounds), both applied to every element of
a tuple, and ``help`` (documentation, shown by ``volumefusion config --fields``); :func:`build_dataclass`
checks them and names the field in every error.

A single value for a list field of any length (``tuple[X, ...]``) means a list of one: ``window_size: 6``
reads as ``[6]``, so files and checkpoints written before a field took a list still load.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from volumefusion import VolumeFusionError

PRESETS = Path(__file__).parent / "configs"
"""The YAML presets shipped with the package, named by file stem (``-c pretrain_paper``)."""


class ConfigError(VolumeFusionError):
    """An invalid configuration value; the message names the field."""


def setting(default, help: str, *, choices=None, min=None, max=None):  # noqa: A002 - mirrors metadata names
    """A dataclass field with the metadata :func:`build_dataclass` checks and ``--fields`` shows:
    ``help``, ``choices`` (allowed values), ``min``/``max`` (inclusive bounds); each applies to every
    element of a tuple."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)



def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` to ``annotation`` (int, float, bool, str, tuples, optionals) or raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        if variable and not isinstance(value, (list, tuple, dict)):
            return (_coerce(value, args[0], name),)  # a single value is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if variable:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {len(value)} ({list(value)!r})")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: {value!r} is not a finite number")
        return float(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")


def _number(value: Any) -> Any:
    """``value``, or the float a string spells (YAML 1.1 reads ``1e-3``, without a dot, as a string):
    numbers read the same from a file and from ``--set``."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _check_field(f: dataclasses.Field, value: Any, name: str) -> None:
    meta = f.metadata
    values = value if isinstance(value, tuple) else (value,)
    wrong = [v for v in values if meta.get("choices") is not None and v not in meta["choices"]]
    if wrong:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{name}: {wrong[0]!r} is not allowed; choose one of: {allowed}")
    for v in values:
        if not isinstance(v, (int, float)) or v is None:
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{name}: {value!r} is out of range; must be >= {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{name}: {value!r} is out of range; must be <= {meta['max']}")


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` (fields declared like this module's) from plain ``data``:
    values converted to the field types and checked against their metadata; unknown fields, wrong
    types and out-of-range values raise :class:`ConfigError` naming ``prefix.field``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{name}: unknown field; allowed: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value or {}, name)
        else:
            kwargs[key] = _coerce(value, hint, name)
            _check_field(fields[key], kwargs[key], name)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain nested dicts and lists, suitable for YAML/JSON and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, nested mappings merged key by key (neither is changed)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``'optim.lr=3e-4'`` -> ``{'optim': {'lr': 0.0003}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    value = _number(value)
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out



def presets() -> list[str]:
    """Names of the bundled presets (usable as ``-c NAME``)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_path(path: str | Path) -> Path:
    """A config file: ``path`` itself when it exists, else the bundled preset of that name
    (``pretrain_paper``, ``pretrain_paper.yaml`` or ``configs/pretrain_paper.yaml`` all name it)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file (or a preset: {', '.join(presets())})")
    preset = PRESETS / f"{path.name.removesuffix('.yaml')}.yaml"
    if preset.is_file() and path.parent.name in ("", "configs"):
        return preset
    raise ConfigError(f"config file {path} does not exist (bundled presets: {', '.join(presets())})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML settings file holds (empty for an empty file); ConfigError naming the file
    for unreadable or invalid YAML, a key given twice, or anything but a mapping."""
    try:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): is it a config file?") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if content is not None and not isinstance(content, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(content).__name__}")
    return content or {}


def declared_command(path: Path) -> str | None:
    """The command a settings file says it is for on its first line, as the bundled ones that are
    not run configs do (``# `volumefusion demo`: ...`` -> ``"volumefusion demo"``); None otherwise."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    found = re.match(r"#\s*`(volumefusion [a-z][a-z-]*)`", first)
    return found[1] if found else None
