"""Keras 3's reshaping layers: ``ZeroPadding2D``, ``Cropping2D``, ``UpSampling2D``, ``Reshape``.

The 2-D layers take ``[N, H, W, C]`` (or ``[N, C, H, W]`` with ``data_format="channels_first"``)
and read their sizes as Keras does: an int (both sides of both axes), two ints (per axis) or
``((top, bottom), (left, right))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import backend
from cnnlab.nn.conv import check_input_ndim

Array = jax.Array


def _pairs(value: Any, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras' ``((top, bottom), (left, right))`` from an int, two ints, or two pairs."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = ((value, value), (value, value))
    try:
        pairs = tuple(
            (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in value
        )
        if len(pairs) != 2 or any(len(p) != 2 or min(p) < 0 for p in pairs):
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"Invalid {name}={value!r}: expected an int, two ints or two pairs of "
                         "non-negative ints.") from None
    return pairs  # type: ignore[return-value]


def _spatial(data_format: str | None) -> tuple[int, int]:
    return (2, 3) if backend.standardize_data_format(data_format) == "channels_first" else (1, 2)


class ZeroPadding2D(nn.Module):
    """Keras ``ZeroPadding2D``: zeros around the image, ``padding=((top, bottom), (left, right))``."""

    padding: Any = (1, 1)
    data_format: str | None = None

    def __post_init__(self) -> None:
        _pairs(self.padding, "padding")
        backend.standardize_data_format(self.data_format)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        check_input_ndim(self, x, 4)
        widths = [(0, 0)] * 4
        for axis, pair in zip(_spatial(self.data_format), _pairs(self.padding, "padding")):
            widths[axis] = pair
        return jnp.pad(x, widths)


class Cropping2D(nn.Module):
    """Keras ``Cropping2D``: removes ``cropping=((top, bottom), (left, right))`` pixels."""

    cropping: Any = ((0, 0), (0, 0))
    data_format: str | None = None

    def __post_init__(self) -> None:
        _pairs(self.cropping, "cropping")
        backend.standardize_data_format(self.data_format)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        check_input_ndim(self, x, 4)
        index = [slice(None)] * 4
        for axis, (lo, hi) in zip(_spatial(self.data_format), _pairs(self.cropping, "cropping")):
            if lo + hi >= x.shape[axis]:
                raise ValueError(f"Cropping2D: cropping {(lo, hi)} leaves nothing of size {x.shape[axis]}.")
            index[axis] = slice(lo, x.shape[axis] - hi)
        return x[tuple(index)]


class UpSampling2D(nn.Module):
    """Keras ``UpSampling2D``: repeats rows and columns ``size`` times (``"nearest"``) or
    resizes (``"bilinear"``, ``"bicubic"``, ``"lanczos3"``, ``"lanczos5"``; no antialiasing)."""

    size: Any = (2, 2)
    data_format: str | None = None
    interpolation: str = "nearest"

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or any(not isinstance(s, int) or s <= 0 for s in size):
            raise ValueError(f"Invalid size={self.size!r}: expected one or two positive ints.")
        if self.interpolation not in ("nearest", "bilinear", "bicubic", "lanczos3", "lanczos5"):
            raise ValueError(f"Invalid interpolation={self.interpolation!r}.")
        backend.standardize_data_format(self.data_format)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        check_input_ndim(self, x, 4)
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        axes = _spatial(self.data_format)
        if self.interpolation == "nearest":
            for axis, s in zip(axes, size):
                x = jnp.repeat(x, s, axis=axis)
            return x
        shape = list(x.shape)
        for axis, s in zip(axes, size):
            shape[axis] *= s
        return jax.image.resize(x, shape, method=self.interpolation, antialias=False).astype(x.dtype)


class Reshape(nn.Module):
    """Keras ``Reshape``: ``[N, ...] -> [N, *target_shape]`` (one entry may be -1)."""

    target_shape: Sequence[int]

    def __call__(self, x: Array) -> Array:
        return jnp.reshape(x, (x.shape[0], *self.target_shape))
