"""Keras 3 weight constraints in pure JAX, with Keras' names and exact formulas.

A constraint is a projection ``c(w) -> w'`` (same shape) applied to a weight after each
optimizer update. Norm constraints measure the L2 norm of ``w`` over ``axis`` (``keepdims``),
so for a Dense kernel ``(in, out)`` the default ``axis=0`` constrains each unit's incoming
weight vector, and for a conv kernel ``(kh, kw, in, out)`` ``axis=(0, 1, 2)`` constrains each
filter. The division uses Keras' fuzz factor ``cnnlab.backend.epsilon()`` (1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cnnlab import backend
from cnnlab._keras_object import KerasObject, classes_in
from cnnlab._registry import Registry, serialize_object

Array = jax.Array
ArrayLike = Any
Axis = int | Sequence[int]


def _axis(axis: Axis) -> int | tuple[int, ...]:
    return axis if isinstance(axis, int) else tuple(int(a) for a in axis)


def _norms(w: Array, axis: Axis) -> Array:
    """L2 norms of ``w`` over ``axis``, kept as size-1 dims so they broadcast against ``w``."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=_axis(axis), keepdims=True))


class Constraint(KerasObject):
    """Base class: ``c(w) -> w`` (the identity)."""

    def __call__(self, w: ArrayLike) -> Array:
        return w


class MaxNorm(Constraint):
    """Rescales slices of ``w`` along ``axis`` whose L2 norm exceeds ``max_value`` down to it:
    ``w * clip(n, 0, max_value) / (eps + n)``."""

    def __init__(self, max_value: float = 2, axis: Axis = 0) -> None:
        self.max_value = max_value
        self.axis = axis

    def __call__(self, w: ArrayLike) -> Array:
        w = jnp.asarray(w)
        norms = _norms(w, self.axis)
        desired = jnp.clip(norms, 0, self.max_value)
        return w.astype(norms.dtype) * (desired / (backend.epsilon() + norms))

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": self.axis}


class NonNeg(Constraint):
    """``max(w, 0)``: clamps negative weights to zero."""

    def __call__(self, w: ArrayLike) -> Array:
        return jnp.maximum(jnp.asarray(w), 0)


class UnitNorm(Constraint):
    """``w / (eps + n)``: slices along ``axis`` get (almost exactly) unit L2 norm."""

    def __init__(self, axis: Axis = 0) -> None:
        self.axis = axis

    def __call__(self, w: ArrayLike) -> Array:
        w = jnp.asarray(w)
        norms = _norms(w, self.axis)
        return w.astype(norms.dtype) / (backend.epsilon() + norms)

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


class MinMaxNorm(Constraint):
    """Moves the L2 norm ``n`` of slices along ``axis`` toward ``[min_value, max_value]``:
    ``w * desired / (eps + n)``, ``desired = rate * clip(n, min, max) + (1 - rate) * n``
    (``rate=1`` enforces the interval strictly, smaller rates move part of the way)."""

    def __init__(
        self,
        min_value: float = 0.0,
        max_value: float = 1.0,
        rate: float = 1.0,
        axis: Axis = 0,
    ) -> None:
        self.min_value = min_value
        self.max_value = max_value
        self.rate = rate
        self.axis = axis

    def __call__(self, w: ArrayLike) -> Array:
        w = jnp.asarray(w)
        norms = _norms(w, self.axis)
        desired = (
            self.rate * jnp.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        )
        return w.astype(norms.dtype) * (desired / (backend.epsilon() + norms))

    def get_config(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


# Keras' lowercase aliases (``keras.constraints.max_norm`` is the class ``MaxNorm``).
max_norm = MaxNorm
non_neg = NonNeg
unit_norm = UnitNorm
min_max_norm = MinMaxNorm

_REGISTRY = Registry("constraint", classes_in(globals(), Constraint))


def names() -> tuple[str, ...]:
    """Every name :func:`get` accepts, sorted."""
    return _REGISTRY.names()


def get(identifier: Any) -> Callable[[ArrayLike], Array] | None:
    """Resolves a constraint identifier as ``keras.constraints.get`` does.

    ``None`` -> ``None``; a name (``"max_norm"``, ``"MaxNorm"``...) or a class -> a default
    instance; ``{"class_name": "MaxNorm", "config": {"max_value": 3}}`` -> instance via
    ``from_config``; an instance or a plain callable ``w -> w`` -> returned unchanged. Unknown
    names raise ``ValueError`` listing the valid ones.
    """
    return _REGISTRY.get(identifier)


def serialize(constraint: Constraint) -> dict[str, Any]:
    """``{"class_name": ..., "config": ...}`` for a built-in constraint."""
    return serialize_object(constraint, _REGISTRY)
