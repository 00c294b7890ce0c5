"""Config utilities shared by the training config, the data config and sweeps (no JAX, no Flax)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections


def copy_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """An unlocked deep copy (flag-loaded configs are locked)."""
    return ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.learning_rate": 1e-3, ...}`` for every leaf of a (nested) config."""
    plain = config.to_dict() if hasattr(config, "to_dict") else config
    out: dict[str, Any] = {}
    for k, v in plain.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
