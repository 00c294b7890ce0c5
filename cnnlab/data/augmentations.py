"""Augmentation ops by name: the config's ``data.augment.ops`` lists them in application order,
and ``data.augment.<op>.<param>`` holds each op's parameters.

An op is registered once, with its parameters declared as :class:`cnnlab.schema.Field`\\ s
(default, type, check, doc, and whether a packed sweep may trace it). A user adds one in their
own module, imported by their config file::

    from cnnlab.data import register_augment
    from cnnlab.schema import Field, in_range

    @register_augment("invert", p=Field(0.5, float, in_range(0, 1), "probability", traceable=True))
    def invert(key, images, labels, *, p):
        import jax, jax.numpy as jnp
        flip = jax.random.bernoulli(key, p, (images.shape[0], 1, 1, 1))
        return jnp.where(flip, 255 - images, images), labels

    config.data.augment.ops = ("invert",)   # in get_config(), after the import

``fn(key, images [B, H, W, C], soft_labels float32 [B, K], **params) -> (images, soft_labels)``
must be traceable; a traceable parameter may arrive as a traced scalar. The built-in ops call
:mod:`cnnlab.data.transforms` (imported when they run, so declaring them needs no JAX);
:func:`augment_pipeline` composes the listed ops.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import ml_collections

from cnnlab._registry import Registry
from cnnlab.schema import (
    Field,
    Schema,
    Section,
    at_least,
    default_config,
    greater_than,
    one_of,
    resolve,
)

FILL_MODES = ("nearest", "reflect", "wrap", "constant")
CROP_FILL_MODES = ("constant", "reflect", "edge")


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """A registered op: its function and its parameters' fields."""

    fn: Callable[..., tuple[Any, Any]]
    fields: dict[str, Field]


AUGMENT_OPS = Registry("augmentation op", {})


def register_augment(name: str, **fields: Field) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn(key, images, labels, **params)`` as augmentation op ``name``
    with parameters ``fields`` (settable as ``data.augment.<name>.<param>``)."""

    if name == "ops":
        raise ValueError("'ops' is the op list's key, not an op name")

    def decorator(fn: Callable) -> Callable:
        AUGMENT_OPS.register(name, AugmentOp(fn, dict(fields)), module=fn.__module__)
        return fn

    return decorator


def augment_schema() -> Schema:
    """``data.augment``: the op list and every registered op's parameters (read at call time,
    so ops registered by a user's module are included). Resolved, it keeps only the listed ops'
    sections (see :func:`_listed_ops_only`)."""
    ops = Field((), tuple, doc="augmentation ops applied in this order (each gets its own key)",
                choices=lambda: AUGMENT_OPS)
    return Section({"ops": ops, **{name: op.fields for name, op in AUGMENT_OPS.items() if op.fields}},
                   _listed_ops_only)


def _listed_ops_only(resolved: dict[str, Any], path: str) -> dict[str, Any]:
    """The ops list and the sections of the ops it lists: a run records what it uses, so its
    ``config.json`` does not depend on which other ops happened to be registered (a process
    that re-reads it need not have them). Parameters set for an op that is not listed would
    have no effect: that is warned about."""
    listed = set(resolved["ops"])
    for name, params in resolved.items():
        if name == "ops" or name in listed:
            continue
        defaults = {p: f.default for p, f in AUGMENT_OPS.lookup(name).fields.items()}
        changed = sorted(p for p, v in params.items() if v != defaults[p])
        if changed:
            warnings.warn(f"{path}.{name}.{', '.join(changed)} set, but {name!r} is not in "
                          f"{path}.ops {tuple(resolved['ops'])}: no effect", UserWarning,
                          stacklevel=2)
    return {k: v for k, v in resolved.items() if k == "ops" or k in listed}


def resolve_augment(config: Any) -> dict[str, Any]:
    """A validated plain-dict ``data.augment`` config (the listed ops' sections filled)."""
    return resolve(augment_schema(), config, prefix="data.augment.")


#: Named augmentation configs (values over the defaults); ``augment_preset`` builds them.
_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # The Keras Conv2D tutorial's ImageDataGenerator settings.
    "tutorial": {
        "ops": ("keras_affine",),
        "keras_affine": {"rotation_range": 20.0, "zoom_range": 0.15, "width_shift_range": 0.2,
                         "height_shift_range": 0.2, "shear_range": 0.15, "horizontal_flip": True,
                         "fill_mode": "nearest"},
    },
}


def augment_preset(name: str) -> ml_collections.ConfigDict:
    """A full ``data.augment`` ConfigDict with the preset's values (``"none"`` or ``"tutorial"``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown augment preset {name!r} ({one_of(name, list(_PRESETS))})")
    cfg = default_config(augment_schema())
    for key, value in _PRESETS[name].items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


# --------------------------------------------------------------------------- pipeline


class AugmentPipeline:
    """The ops of a ``data.augment`` config, composed; built by :func:`augment_pipeline`."""

    def __init__(self, config: Any, num_classes: int) -> None:
        import jax  # here, so declaring ops and configs needs no JAX

        cfg = resolve_augment(config)
        self.num_classes = num_classes
        self.ops = tuple(cfg["ops"])
        self._params = {name: cfg.get(name, {}) for name in self.ops}  # an op may have no fields
        self._traceable = {
            f"{name}.{p}": float(v)
            for name in dict.fromkeys(self.ops)
            for p, v in self._params[name].items()
            if AUGMENT_OPS.lookup(name).fields[p].traceable and isinstance(v, float)
        }
        self._apply = jax.jit(self._run)

    def traceable(self) -> dict[str, float]:
        """``{"<op>.<param>": value}`` for every parameter that may be passed traced."""
        return dict(self._traceable)

    def structure(self) -> dict[str, Any]:
        """What the compiled program depends on besides :meth:`traceable`'s values (JSON-able):
        equal structures can share one program with different traced values."""
        out: dict[str, Any] = {"ops": list(self.ops), "num_classes": self.num_classes}
        for name in self.ops:
            out[name] = {p: "traced" if f"{name}.{p}" in self._traceable else
                         (list(v) if isinstance(v, tuple) else v) for p, v in self._params[name].items()}
        return out

    def __call__(self, key: Any, images: Any, labels: Any, traced: dict[str, Any] | None = None
                 ) -> tuple[Any, Any]:
        """``(images [B, H, W, C], soft labels float32 [B, num_classes])`` from uint8 (or float)
        images and int labels [B]. ``traced`` replaces values of :meth:`traceable` (a Python
        value there gives what the same value in the config gives)."""
        bad = sorted(set(traced or {}) - set(self._traceable))
        if bad:
            raise ValueError(f"augment parameters {bad} cannot be traced here (not a listed op's "
                             f"traceable float parameter); traceable: {sorted(self._traceable)}")
        return self._apply(key, images, labels, dict(traced or {}))

    def _run(self, key, images, labels, traced):
        import jax

        y = jax.nn.one_hot(labels, self.num_classes, dtype="float32")
        if not self.ops:
            return images, y
        for k, name in zip(jax.random.split(key, len(self.ops)), self.ops, strict=True):
            params = {p: traced.get(f"{name}.{p}", v) for p, v in self._params[name].items()}
            images, y = AUGMENT_OPS.lookup(name).fn(k, images, y, **params)
        return images, y


def augment_pipeline(config: Any, num_classes: int) -> AugmentPipeline:
    """``pipeline(key, images, int_labels, traced=None) -> (images, soft_labels)`` for a
    ``data.augment`` config (a ConfigDict or dict; validated here).

    Op ``i`` of ``config.ops`` gets ``jax.random.split(key, len(ops))[i]``. No ops: the images
    unchanged and one-hot labels. The images keep their dtype unless a mixing op makes them
    float32. Pure and traceable, so it can run inside a jitted train step.
    """
    return AugmentPipeline(config, num_classes)


# --------------------------------------------------------------------------- built-in ops


def _shift_check(v: Any) -> str | None:
    if isinstance(v, tuple):
        ok = v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        return None if ok else "must be a number >= 0 or a non-empty list of numbers"
    return None if v >= 0 else "must be >= 0 (a fraction of the size if < 1, else pixels)"


def _zoom_check(v: Any) -> str | None:
    if isinstance(v, tuple):
        ok = len(v) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in v) and v[0] <= v[1]
        return None if ok else "must be a float in [0, 1) or a pair (lo, hi) with 0 < lo <= hi"
    return None if 0 <= v < 1 else "must be in [0, 1) or a pair (lo, hi)"


def _shift(axis: str) -> Field:
    return Field(0.0, (float, int, tuple), _shift_check, traceable=True,
                 doc=f"{axis} shift: float s ~ U(-s, s), times the {axis} if s < 1; int s: an "
                     "integer in (-s, s); list: one of its values with a random sign (Keras)")


@register_augment(
    "keras_affine",
    rotation_range=Field(0.0, float, at_least(0), "rotation ~ U(-r, r) degrees", traceable=True),
    width_shift_range=_shift("width"),
    height_shift_range=_shift("height"),
    shear_range=Field(0.0, float, at_least(0), "shear ~ U(-s, s) degrees", traceable=True),
    zoom_range=Field(0.0, (float, tuple), _zoom_check, traceable=True,
                     doc="zx, zy ~ U(1-z, 1+z) independently, or U(lo, hi) for a pair"),
    horizontal_flip=Field(False, bool, doc="flip left-right with probability 1/2"),
    vertical_flip=Field(False, bool, doc="flip upside-down with probability 1/2"),
    fill_mode=Field("nearest", str, choices=FILL_MODES, doc="samples outside the image (scipy's modes)"),
    cval=Field(0.0, float, doc="fill value of fill_mode='constant'"),
)
def _keras_affine(key, images, labels, **params):
    """Keras ``ImageDataGenerator``'s random affine warp and flips (see :mod:`cnnlab.data.transforms`)."""
    from cnnlab.data.transforms import random_affine

    return random_affine(key, images, **params), labels


@register_augment(
    "random_crop",
    padding=Field(4, int, at_least(0), "pixels padded on each side before a random H x W crop"),
    fill=Field("constant", str, choices=CROP_FILL_MODES, doc="how the padding is filled"),
    cval=Field(0.0, float, doc="padding value of fill='constant'"),
)
def _random_crop(key, images, labels, *, padding, fill, cval):
    """Pad-and-crop."""
    from cnnlab.data import transforms

    return transforms.random_crop(key, images, padding, fill, cval), labels


def _alpha(default: float, what: str) -> Field:
    return Field(default, float, greater_than(0), f"{what}: lam ~ Beta(alpha, alpha) per batch",
                 traceable=True)


@register_augment("mixup", alpha=_alpha(0.2, "mixup"))
def _mixup(key, images, labels, *, alpha):
    """Mixup with a permutation of the batch (images become float32)."""
    from cnnlab.data import transforms

    return transforms.mixup(key, images, labels, alpha)


@register_augment("cutmix", alpha=_alpha(1.0, "cutmix"))
def _cutmix(key, images, labels, *, alpha):
    """CutMix: a box pasted from a permutation of the batch, labels mixed by its area."""
    from cnnlab.data import transforms

    return transforms.cutmix(key, images, labels, alpha)


@register_augment("mixup_or_cutmix", mixup_alpha=_alpha(0.2, "mixup"),
                  cutmix_alpha=_alpha(1.0, "cutmix"))
def _mixup_or_cutmix(key, images, labels, *, mixup_alpha, cutmix_alpha):
    """Each batch either mixup or cutmix, with probability 1/2 (images become float32)."""
    import jax

    from cnnlab.data import transforms

    k_mix, k_choice = jax.random.split(key)
    x = images.astype("float32")
    xm, ym = transforms.mixup(k_mix, x, labels, mixup_alpha)
    xc, yc = transforms.cutmix(k_mix, x, labels, cutmix_alpha)
    use_mix = jax.random.bernoulli(k_choice, 0.5)
    return jax.numpy.where(use_mix, xm, xc), jax.numpy.where(use_mix, ym, yc)


# --------------------------------------------------------------------------- policies and small-data ops


def _range_check(lo_min: float, hi_max: float | None = None):
    def check(v: Any) -> str | None:
        ok = (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
              and lo_min < v[0] <= v[1] and (hi_max is None or v[1] <= hi_max))
        upper = f" <= {hi_max}" if hi_max is not None else ""
        return None if ok else f"must be a pair (lo, hi) with {lo_min} < lo <= hi{upper}"
    return check


@register_augment("trivial_augment")
def _trivial_augment(key, images, labels):
    """TrivialAugment Wide: one op per image (colour or geometric), random magnitude."""
    from cnnlab.data import policy

    return policy.trivial_augment(key, images), labels


@register_augment(
    "rand_augment",
    num_ops=Field(2, int, at_least(1), "N: ops applied in turn to each image"),
    magnitude=Field(9.0, float, lambda v: None if 0 <= v <= 30 else "must be in [0, 30]",
                    "M: every op's strength, of 30 (torchvision's scale)", traceable=True),
)
def _rand_augment(key, images, labels, *, num_ops, magnitude):
    """RandAugment: N ops per image, each drawn uniformly, at magnitude M."""
    from cnnlab.data import policy

    return policy.rand_augment(key, images, num_ops=num_ops, magnitude=magnitude), labels


@register_augment(
    "random_resized_crop",
    scale=Field((0.08, 1.0), tuple, _range_check(0.0, 1.0), "area share of the crop ~ U(lo, hi)"),
    ratio=Field((0.75, 4 / 3), tuple, _range_check(0.0), "aspect (w / h) ~ log-U(lo, hi)"),
)
def _random_resized_crop(key, images, labels, *, scale, ratio):
    """A random box (area share and aspect) resized back to the image size."""
    from cnnlab.data import policy

    return policy.random_resized_crop(key, images, scale=scale, ratio=ratio), labels


@register_augment(
    "random_erasing",
    p=Field(0.25, float, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
            "probability of erasing a box in each image", traceable=True),
    scale=Field((0.02, 1 / 3), tuple, _range_check(0.0, 1.0), "area share of the box ~ U(lo, hi)"),
    ratio=Field((0.3, 1 / 0.3), tuple, _range_check(0.0), "aspect (w / h) ~ log-U(lo, hi)"),
)
def _random_erasing(key, images, labels, *, p, scale, ratio):
    """A box of uniform noise, with probability p per image."""
    from cnnlab.data import policy

    return policy.random_erasing(key, images, p=p, scale=scale, ratio=ratio), labels


def _jitter(doc: str, hi: float | None = None) -> Field:
    check = (lambda v: None if 0 <= v <= hi else f"must be in [0, {hi}]") if hi else at_least(0)
    return Field(0.4 if hi is None else 0.0, float, check, doc, traceable=True)


@register_augment(
    "color_jitter",
    brightness=_jitter("brightness factor ~ U(1 - b, 1 + b)"),
    contrast=_jitter("contrast factor ~ U(1 - c, 1 + c)"),
    saturation=_jitter("saturation factor ~ U(1 - s, 1 + s)"),
    hue=_jitter("hue rotation ~ U(-h, h) turns", 0.5),
)
def _color_jitter(key, images, labels, *, brightness, contrast, saturation, hue):
    """torchvision's ColorJitter: brightness, contrast, saturation, then hue."""
    from cnnlab.data import policy

    return policy.color_jitter(key, images, brightness=brightness, contrast=contrast,
                               saturation=saturation, hue=hue), labels
