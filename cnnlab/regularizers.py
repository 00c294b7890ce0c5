"""Keras 3 weight/activity regularizers in pure JAX, with Keras' names and exact formulas.

A regularizer is called on an array of any shape and returns a scalar penalty (same dtype as
the input) that is added to the training loss. Note Keras' L2 penalty is ``l2 * sum(x**2)``,
*without* a factor 1/2 (unlike ``optax``/PyTorch weight decay conventions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cnnlab import backend
from cnnlab._keras_object import KerasObject, classes_in
from cnnlab._registry import Registry, serialize_object

Array = jax.Array
ArrayLike = Any


def _validate_float_arg(value: Any, name: str) -> float:
    """A non-negative finite float, else ``ValueError`` (Keras' ``validate_float_arg``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (float, int))
        or math.isinf(value)
        or math.isnan(value)
        or value < 0
    ):
        raise ValueError(
            f"Invalid value for argument {name}: expected a non-negative float. "
            f"Received: {name}={value!r}"
        )
    return float(value)


class Regularizer(KerasObject):
    """Base class: ``reg(x) -> scalar`` penalty for an array ``x`` of any shape."""

    def __call__(self, x: ArrayLike) -> Array | float:
        return 0.0

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (Keras' format); the base class has none to give."""
        raise NotImplementedError(f"{type(self).__name__} does not implement get_config()")


class L1L2(Regularizer):
    """``l1 * sum(|x|) + l2 * sum(x**2)``; a zero factor's term is skipped. Both default to 0
    (Keras keeps ``L1L2()`` a no-op for backward compatibility)."""

    def __init__(self, l1: float | None = 0.0, l2: float | None = 0.0) -> None:
        self.l1 = _validate_float_arg(0.0 if l1 is None else l1, name="l1")
        self.l2 = _validate_float_arg(0.0 if l2 is None else l2, name="l2")

    def __call__(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        regularization = jnp.asarray(0.0, dtype=x.dtype)
        if self.l1 != 0.0:
            regularization += jnp.asarray(self.l1, x.dtype) * jnp.sum(jnp.abs(x))
        if self.l2 != 0.0:
            regularization += jnp.asarray(self.l2, x.dtype) * jnp.sum(jnp.square(x))
        return regularization

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


class L1(Regularizer):
    """``l1 * sum(|x|)``."""

    def __init__(self, l1: float | None = 0.01) -> None:
        self.l1 = _validate_float_arg(0.01 if l1 is None else l1, name="l1")

    def __call__(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        return jnp.asarray(self.l1, x.dtype) * jnp.sum(jnp.abs(x))

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


class L2(Regularizer):
    """``l2 * sum(x**2)`` (no 1/2 factor). ``l2`` may be a ``jax.Array`` (e.g. traced, one per
    packed sweep trial), kept unvalidated; the penalty is the same formula."""

    def __init__(self, l2: float | Array | None = 0.01) -> None:
        self.l2 = l2 if isinstance(l2, jax.Array) else _validate_float_arg(0.01 if l2 is None else l2, name="l2")

    def __call__(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        return jnp.asarray(self.l2, x.dtype) * jnp.sum(jnp.square(x))

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


def _l2_normalize(x: Array, axis: int) -> Array:
    """Keras' ``ops.normalize(x, axis, order=2)``: ``x * min(rsqrt(sum(x**2)), 1 / eps)``."""
    square_sum = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    inv_norm = jnp.minimum(jax.lax.rsqrt(square_sum), 1.0 / backend.epsilon())
    return x * inv_norm


class OrthogonalRegularizer(Regularizer):
    """Penalizes non-orthogonality of the rows (``mode="rows"``) or columns of a rank-2 ``x``.

    With ``v_i`` the L2-normalized rows (columns), the penalty is
    ``factor * 0.5 * sum_{i != j} |v_i . v_j| / (n (n - 1) / 2)``, i.e. ``factor`` times the mean
    absolute cosine similarity over distinct pairs.
    """

    def __init__(self, factor: float = 0.01, mode: str = "rows") -> None:
        self.factor = _validate_float_arg(factor, name="factor")
        if mode not in ("rows", "columns"):
            raise ValueError(
                "Invalid value for argument `mode`. Expected one of "
                f'{{"rows", "columns"}}. Received: mode={mode!r}'
            )
        self.mode = mode

    def __call__(self, inputs: ArrayLike) -> Array:
        inputs = jnp.asarray(inputs)
        if inputs.ndim != 2:
            raise ValueError(
                "Inputs to OrthogonalRegularizer must have rank 2. Received: "
                f"inputs.shape={tuple(inputs.shape)}"
            )
        if self.mode == "rows":
            inputs = _l2_normalize(inputs, axis=1)
            product = inputs @ inputs.T
            size = inputs.shape[0]
        else:
            inputs = _l2_normalize(inputs, axis=0)
            product = inputs.T @ inputs
            size = inputs.shape[1]
        product_no_diagonal = product * (1.0 - jnp.eye(size, dtype=inputs.dtype))
        num_pairs = size * (size - 1.0) / 2.0
        return self.factor * 0.5 * jnp.sum(jnp.abs(product_no_diagonal)) / num_pairs

    def get_config(self) -> dict[str, Any]:
        return {"factor": self.factor, "mode": self.mode}


# Keras' lowercase aliases (``keras.regularizers.l2`` is the class ``L2``).
l1 = L1
l2 = L2
l1_l2 = L1L2
orthogonal_regularizer = OrthogonalRegularizer

# "l1l2" is Keras' snake_case of "L1L2" (``l1_l2`` its exported alias).
_REGISTRY = Registry("regularizer", {**classes_in(globals(), Regularizer), "l1l2": L1L2})


def names() -> tuple[str, ...]:
    """Every name :func:`get` accepts, sorted."""
    return _REGISTRY.names()


def get(identifier: Any) -> Callable[[ArrayLike], Array] | None:
    """Resolves a regularizer identifier as ``keras.regularizers.get`` does.

    ``None`` -> ``None``; a name (``"l2"``, ``"L1L2"``...) or a class -> a default instance;
    ``{"class_name": "L2", "config": {"l2": 1e-4}}`` -> instance via ``from_config``; an
    instance or a plain callable ``x -> scalar`` -> returned unchanged. Unknown names raise
    ``ValueError`` listing the valid ones.
    """
    return _REGISTRY.get(identifier)


def serialize(regularizer: Regularizer) -> dict[str, Any]:
    """``{"class_name": ..., "config": ...}`` for a built-in regularizer."""
    return serialize_object(regularizer, _REGISTRY)
