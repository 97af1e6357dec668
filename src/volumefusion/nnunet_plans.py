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


def plans_configuration(path: str | Path, name: str) -> dict[str, Any]:
    """Configuration ``name`` of the nnU-Net plans file ``path`` as a dict, with the entries it
    inherits (``inherits_from``) filled in; errors name ``model.plans`` / ``model.configuration``.

    Only the JSON is read (no nnU-Net import): ``patch_size`` (z, y, x voxels of nnU-Net's
    preprocessed arrays), ``spacing``, ``architecture`` (``network_class_name``, ``arch_kwargs``).
    """
    try:
        plans = json.loads(Path(path).read_text())
        configurations = plans["configurations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.plans: {path} is not a readable nnU-Net plans file ({exc})") from None
    if name not in configurations:
        raise ConfigError(f"model.configuration: {name!r} is not in {path}; it has: {', '.join(configurations)}")
    merged: dict[str, Any] = {}
    seen = []
    while name is not None and name not in seen:  # the parent first, so the child's entries win
        seen.append(name)
        merged = {**configurations[name], **merged}
        name = configurations[name].get("inherits_from")
    merged.pop("inherits_from", None)
    if len(merged.get("patch_size", [])) != 3 or "architecture" not in merged:
        raise ConfigError(f"model.configuration: {seen[0]!r} of {path} is not a 3D configuration with an "
                          "architecture (nnU-Net v2 plans); choose a 3d one such as 3d_fullres")
    return merged
