"""Keras 3's merge layers: a list of arrays in, one array out.

Each one is called as Keras' is, ``Add()([a, b, ...])``, and folds the list left to right in
Keras' operation order (so float rounding matches): ``Add`` ``((a + b) + c)``, ``Average``
``(a + b + c) / 3``. Shapes broadcast as in NumPy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class _Merge(nn.Module):
    """``inputs[0] op inputs[1] op ...`` with ``op`` a binary function."""

    combine: ClassVar[Callable[[Array, Array], Array]]
    min_inputs: ClassVar[int] = 1

    def check(self, inputs: Sequence[Array]) -> list[Array]:
        if not isinstance(inputs, (list, tuple)) or len(inputs) < self.min_inputs:
            raise ValueError(f"{type(self).__name__} takes a list of at least {self.min_inputs} "
                             f"arrays; got {type(inputs).__name__}.")
        return list(inputs)

    def fold(self, inputs: Sequence[Array]) -> Array:
        inputs = self.check(inputs)
        out = inputs[0]
        for x in inputs[1:]:
            out = type(self).combine(out, x)
        return out

    def __call__(self, inputs: Sequence[Array]) -> Array:
        return self.fold(inputs)


class Add(_Merge):
    """Keras ``Add``: the elementwise sum of a list of arrays."""

    combine = staticmethod(jnp.add)


class Multiply(_Merge):
    """Keras ``Multiply``: the elementwise product of a list of arrays."""

    combine = staticmethod(jnp.multiply)


class Maximum(_Merge):
    """Keras ``Maximum``: the elementwise maximum of a list of arrays."""

    combine = staticmethod(jnp.maximum)


class Minimum(_Merge):
    """Keras ``Minimum``: the elementwise minimum of a list of arrays."""

    combine = staticmethod(jnp.minimum)


class Average(_Merge):
    """Keras ``Average``: the sum of a list of arrays divided by their number."""

    combine = staticmethod(jnp.add)

    def __call__(self, inputs: Sequence[Array]) -> Array:
        return self.fold(inputs) / len(inputs)


class Subtract(_Merge):
    """Keras ``Subtract``: ``inputs[0] - inputs[1]`` (exactly two arrays)."""

    min_inputs = 2

    def __call__(self, inputs: Sequence[Array]) -> Array:
        a, b = self.check(inputs) if len(inputs) == 2 else self.check(())
        return jnp.subtract(a, b)


class Concatenate(nn.Module):
    """Keras ``Concatenate``: joins a list of arrays along ``axis`` (default the last)."""

    axis: int = -1

    def __call__(self, inputs: Sequence[Array]) -> Array:
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError(f"Concatenate takes a non-empty list of arrays; got {type(inputs).__name__}.")
        return jnp.concatenate(list(inputs), axis=self.axis)
