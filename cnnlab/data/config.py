"""Data configuration: defaults, presets and validation.

The fields are documented in the :mod:`cnnlab.data` package docstring. This module turns a
``ml_collections.ConfigDict`` or a plain ``dict`` into a validated, fully populated plain dict
(:func:`resolve_config`), raising ``ValueError`` naming the field for unknown fields and bad
values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

#: Named class selections.
CLASS_PRESETS: dict[str, tuple[str, ...]] = {
    # The Keras Conv2D tutorial's four classes (2,233 images).
    "tutorial4": ("Faces", "Leopards", "Motorbikes", "airplanes"),
}

BACKGROUND_CLASS = "BACKGROUND_Google"

SOURCES = ("folder", "synthetic", "tfds")
SPLITS = ("stratified", "tfds")
RESIZE_MODES = ("stretch", "crop", "pad")
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CACHE_VERIFY = ("full", "sample")
FILL_MODES = ("nearest", "reflect", "wrap", "constant")
CROP_FILL_MODES = ("constant", "reflect", "edge")
AUGMENT_PRESETS = ("none", "tutorial")

_AUGMENT_DEFAULTS: dict[str, Any] = {
    "preset": "none",
    "rotation_range": 0.0,
    "width_shift_range": 0.0,
    "height_shift_range": 0.0,
    "shear_range": 0.0,
    "zoom_range": 0.0,
    "horizontal_flip": False,
    "vertical_flip": False,
    "fill_mode": "nearest",
    "cval": 0.0,
    "random_crop_padding": 0,
    "random_crop_fill": "constant",
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
}

#: Augmentation presets: values that replace the defaults before explicit fields apply.
_AUGMENT_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "none": {},
    # The Keras Conv2D tutorial's ImageDataGenerator settings.
    "tutorial": {
        "rotation_range": 20.0,
        "zoom_range": 0.15,
        "width_shift_range": 0.2,
        "height_shift_range": 0.2,
        "shear_range": 0.15,
        "horizontal_flip": True,
        "fill_mode": "nearest",
    },
}

_DEFAULTS: dict[str, Any] = {
    "source": "folder",
    "data_dir": None,
    "classes": "tutorial4",
    "drop_background": False,
    "max_per_class": 0,
    "split": "stratified",
    "test_fraction": 0.25,
    "train_per_class": 30,
    "val_fraction": 0.0,
    "split_seed": 42,
    "image_size": 96,
    "resize": "stretch",
    "resample": "bilinear",
    "pad_value": 0,
    "fast_decode": False,
    "cache_dir": None,
    "use_cache": True,
    "cache_verify": "full",
    "num_workers": -1,
    "synthetic_num_classes": 4,
    "synthetic_per_class": 100,
    "synthetic_seed": 0,
    "tfds_data_dir": None,
    "tfds_manual_dir": None,
    "tfds_download": False,
}


def default_augment_config() -> ml_collections.ConfigDict:
    """Augmentation fields with their defaults (all ranges zero: the identity)."""
    return ml_collections.ConfigDict(dict(_AUGMENT_DEFAULTS))


def augment_preset(name: str) -> ml_collections.ConfigDict:
    """An augmentation config with the preset's values filled in (``"none"`` or ``"tutorial"``)."""
    if name not in _AUGMENT_PRESET_VALUES:
        raise ValueError(
            f"augment.preset: unknown preset {name!r}; expected one of {AUGMENT_PRESETS}"
        )
    cfg = dict(_AUGMENT_DEFAULTS)
    cfg.update(_AUGMENT_PRESET_VALUES[name])
    cfg["preset"] = name
    return ml_collections.ConfigDict(cfg)


def default_data_config() -> ml_collections.ConfigDict:
    """All data fields with their defaults, as a ConfigDict a training config can embed."""
    cfg = ml_collections.ConfigDict(dict(_DEFAULTS))
    cfg.augment = default_augment_config()
    return cfg


def _to_plain(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {
            k: (_to_plain(v) if isinstance(v, ml_collections.ConfigDict) else v)
            for k, v in config.items()
        }
    raise TypeError(f"data config must be a ConfigDict or a dict, got {type(config).__name__}")


def _bad(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"data config field {field!r}: invalid value {value!r} ({expected})")


def _check_choice(cfg: dict, field: str, choices: tuple[str, ...]) -> None:
    if cfg[field] not in choices:
        raise _bad(field, cfg[field], f"expected one of {choices}")


def _check_int(cfg: dict, field: str, minimum: int) -> None:
    v = cfg[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _bad(field, v, f"expected an integer >= {minimum}")


def _check_bool(cfg: dict, field: str) -> None:
    if not isinstance(cfg[field], bool):
        raise _bad(field, cfg[field], "expected a bool")


def _check_fraction(cfg: dict, field: str, allow_zero: bool) -> None:
    v = cfg[field]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (0.0 <= v < 1.0 if allow_zero else 0.0 < v < 1.0)
    if not ok:
        raise _bad(
            field,
            v,
            "expected a fraction in [0, 1)" if allow_zero else "expected a fraction in (0, 1)",
        )


def _check_path(cfg: dict, field: str) -> None:
    v = cfg[field]
    if v is not None and not isinstance(v, (str, os.PathLike)):
        raise _bad(field, v, "expected a path string or None")
    if v == "":
        cfg[field] = None


def image_hw(image_size: Any) -> tuple[int, int]:
    """``96`` -> ``(96, 96)``; ``(h, w)`` -> ``(h, w)``."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return int(image_size), int(image_size)
    return int(image_size[0]), int(image_size[1])


def _normalize_classes(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        v = value.strip()
        if v in ("all", *CLASS_PRESETS):
            return v
        names = tuple(s.strip() for s in v.split(",") if s.strip())
        if not names:
            raise _bad("classes", value, "expected 'all', a preset name, or class names")
        return names
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, str) and s for s in value):
        return tuple(value)
    raise _bad(
        "classes",
        value,
        f"expected 'all', one of the presets {tuple(CLASS_PRESETS)}, a comma-separated string or a list of class names",
    )


def resolve_augment_config(config: Any = None) -> dict[str, Any]:
    """Validated plain-dict augmentation config.

    The preset's values are applied first; every field whose value differs from the
    all-zero default then overrides the preset.
    """
    user = _to_plain(config)
    unknown = sorted(set(user) - set(_AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown augment config field(s) {unknown}; known fields: {sorted(_AUGMENT_DEFAULTS)}"
        )
    preset = user.get("preset", "none") or "none"
    if preset not in _AUGMENT_PRESET_VALUES:
        raise _bad("augment.preset", preset, f"expected one of {AUGMENT_PRESETS}")
    cfg = dict(_AUGMENT_DEFAULTS)
    cfg.update(_AUGMENT_PRESET_VALUES[preset])
    for k, v in user.items():
        if k != "preset" and v != _AUGMENT_DEFAULTS[k]:
            cfg[k] = v
    cfg["preset"] = preset
    for f in ("rotation_range", "shear_range", "cval", "mixup_alpha", "cutmix_alpha"):
        v = cfg[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"augment.{f}", v, "expected a number")
        if f != "cval" and v < 0:
            raise _bad(f"augment.{f}", v, "expected a number >= 0")
        cfg[f] = float(v)
    for f in ("width_shift_range", "height_shift_range"):
        v = cfg[f]
        if isinstance(v, (list, tuple)):
            if not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise _bad(f"augment.{f}", v, "expected a number or a list of numbers")
            cfg[f] = tuple(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _bad(
                f"augment.{f}", v, "expected a number >= 0 (fraction if < 1, pixels if >= 1)"
            )
    z = cfg["zoom_range"]
    if isinstance(z, (list, tuple)):
        if len(z) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in z) or z[0] > z[1]:
            raise _bad(
                "augment.zoom_range", z, "expected a float z or a pair [lo, hi] with 0 < lo <= hi"
            )
        cfg["zoom_range"] = (float(z[0]), float(z[1]))
    elif isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 <= z < 1:
        raise _bad("augment.zoom_range", z, "expected a float in [0, 1) or a pair [lo, hi]")
    for f in ("horizontal_flip", "vertical_flip"):
        if not isinstance(cfg[f], bool):
            raise _bad(f"augment.{f}", cfg[f], "expected a bool")
    if cfg["fill_mode"] not in FILL_MODES:
        raise _bad("augment.fill_mode", cfg["fill_mode"], f"expected one of {FILL_MODES}")
    if cfg["random_crop_fill"] not in CROP_FILL_MODES:
        raise _bad(
            "augment.random_crop_fill",
            cfg["random_crop_fill"],
            f"expected one of {CROP_FILL_MODES}",
        )
    p = cfg["random_crop_padding"]
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise _bad("augment.random_crop_padding", p, "expected an integer >= 0")
    return cfg


def resolve_config(config: Any = None) -> dict[str, Any]:
    """Validated, fully populated plain-dict data config (defaults for missing fields).

    Raises:
      ValueError: an unknown field or a bad value (the message names the field).
    """
    user = _to_plain(config)
    allowed = set(_DEFAULTS) | {"augment"}
    unknown = sorted(set(user) - allowed)
    if unknown:
        raise ValueError(f"unknown data config field(s) {unknown}; known fields: {sorted(allowed)}")
    cfg = dict(_DEFAULTS)
    cfg.update({k: v for k, v in user.items() if k != "augment"})
    cfg["augment"] = resolve_augment_config(user.get("augment"))

    _check_choice(cfg, "source", SOURCES)
    _check_choice(cfg, "split", SPLITS)
    _check_choice(cfg, "resize", RESIZE_MODES)
    _check_choice(cfg, "resample", RESAMPLE_FILTERS)
    _check_choice(cfg, "cache_verify", CACHE_VERIFY)
    for f in ("data_dir", "cache_dir", "tfds_data_dir", "tfds_manual_dir"):
        _check_path(cfg, f)
    cfg["classes"] = _normalize_classes(cfg["classes"])
    for f in ("drop_background", "fast_decode", "use_cache", "tfds_download"):
        _check_bool(cfg, f)
    if cfg["max_per_class"] is None:
        cfg["max_per_class"] = 0
    _check_int(cfg, "max_per_class", 0)
    _check_int(cfg, "train_per_class", 1)
    _check_int(cfg, "split_seed", 0)
    _check_int(cfg, "synthetic_num_classes", 2)
    _check_int(cfg, "synthetic_per_class", 2)
    _check_int(cfg, "synthetic_seed", 0)
    _check_int(cfg, "pad_value", 0)
    if cfg["pad_value"] > 255:
        raise _bad("pad_value", cfg["pad_value"], "expected an integer in [0, 255]")
    nw = cfg["num_workers"]
    if isinstance(nw, bool) or not isinstance(nw, int) or nw < -1:
        raise _bad(
            "num_workers", nw, "expected -1 (all cores), 0 (in-process) or a positive integer"
        )
    _check_fraction(cfg, "test_fraction", allow_zero=False)
    _check_fraction(cfg, "val_fraction", allow_zero=True)
    size = cfg["image_size"]
    ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    )
    if not ok:
        raise _bad("image_size", size, "expected a positive int or a pair (height, width)")
    if isinstance(size, (list, tuple)):
        cfg["image_size"] = (int(size[0]), int(size[1]))
    if cfg["synthetic_num_classes"] > 64:
        raise _bad(
            "synthetic_num_classes", cfg["synthetic_num_classes"], "at most 64 synthetic classes"
        )
    return cfg
