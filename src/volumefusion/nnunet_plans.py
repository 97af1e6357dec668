"""nnU-Net v2 plans files, read as data: the adapter between a plans file and volumefusion's configs
(``model.name: nnunet`` builds a plans configuration's network; ``export nnunet`` writes a plans variant).

Only the JSON is read, never nnU-Net itself, so configs that name a plans file validate without the
``volumefusion[nnunet]`` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from volumefusion.typed_config import ConfigError


def describe_json(value: Any) -> str:
    """A value read from JSON as an error message names it: ``'a list'``, ``'a string "8x8x8"'``."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if not isinstance(value, (dict, list)) else ""
    return f"{kind} {text[:40]}".strip()


def check_plans_model(model: Any) -> None:
    """The rules of ``model.name: nnunet`` (``model`` a :class:`~volumefusion.config.ModelConfig`): a
    plans file must be named, and the configuration to build must read from it (ConfigError otherwise)."""
    if not model.plans:
        raise ConfigError("model.plans: model.name nnunet builds the network of an nnU-Net plans file; set "
                          "model.plans=PATH (e.g. $nnUNet_preprocessed/Dataset001_X/nnUNetPlans.json)")
    plans_configuration(model.plans, model.configuration)


def plans_crop(model: Any) -> tuple[int, ...]:
    """The training crop of a plans network when the config names none: its configuration's patch size."""
    return tuple(plans_configuration(model.plans, model.configuration)["patch_size"])


def plans_configuration(path: str | Path, name: str) -> dict[str, Any]:
    """Configuration ``name`` of the nnU-Net plans file ``path`` as a dict, with the entries it
    inherits (``inherits_from``) filled in; errors name ``model.plans`` / ``model.configuration``,
    the file and what in it is wrong.

    Only the JSON is read (no nnU-Net import): ``patch_size`` (z, y, x voxels of nnU-Net's
    preprocessed arrays), ``spacing``, ``architecture`` (``network_class_name``, ``arch_kwargs``).
    """
    try:
        plans = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.plans: {path} is not a readable nnU-Net plans file ({exc})") from None
    configurations = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(plans, dict):
        found = f"the file holds {describe_json(plans)}"
    elif not isinstance(configurations, dict):
        found = f"'configurations' is {describe_json(configurations)}"
    else:
        found = next((f"configuration {key!r} is {describe_json(value)}" for key, value in configurations.items()
                      if not isinstance(value, dict)), None)
    if found:
        raise ConfigError(f"model.plans: {path} is not an nnU-Net v2 plans file ({found}; expected an object with "
                          "'configurations': {name: {settings}})")
    if name not in configurations:
        raise ConfigError(f"model.configuration: {name!r} is not in {path}; it has: {', '.join(configurations)}")
    merged: dict[str, Any] = {}
    chain = [name]
    while True:  # the parent first, so the child's entries win
        merged = {**configurations[chain[-1]], **merged}
        parent = configurations[chain[-1]].get("inherits_from")
        if parent is None:
            break
        if parent not in configurations:
            raise ConfigError(f"model.configuration: {chain[-1]!r} of {path} inherits_from {parent!r}, which is not "
                              f"in the file; it has: {', '.join(configurations)}")
        if parent in chain:
            raise ConfigError(f"model.configuration: {name!r} of {path} inherits from itself "
                              f"({' -> '.join(chain + [parent])})")
        chain.append(parent)
    merged.pop("inherits_from", None)
    patch, arch = merged.get("patch_size"), merged.get("architecture")
    if patch is None or (isinstance(patch, list) and len(patch) != 3) or not isinstance(arch, dict):
        raise ConfigError(f"model.configuration: {name!r} of {path} is not a 3D configuration with an "
                          "architecture (nnU-Net v2 plans); choose a 3d one such as 3d_fullres")
    if not (isinstance(patch, list) and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise ConfigError(f"model.configuration: {name!r} of {path}: patch_size {json.dumps(patch)} is not three "
                          "positive whole numbers of voxels")
    spacing = merged.get("spacing", [1, 1, 1])
    if not (isinstance(spacing, list) and len(spacing) == 3
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing)):
        raise ConfigError(f"model.configuration: {name!r} of {path}: spacing {json.dumps(spacing)} is not three "
                          "positive millimetre values")
    if not isinstance(arch.get("network_class_name"), str) or not isinstance(arch.get("arch_kwargs"), dict):
        raise ConfigError(f"model.configuration: {name!r} of {path}: its architecture needs 'network_class_name' "
                          "(a dotted class path) and 'arch_kwargs' (an object); plan the dataset with nnU-Net v2")
    return merged
