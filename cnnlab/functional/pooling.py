"""Keras-exact pooling as pure JAX functions on ``jax.lax.reduce_window``.

``max_pool``/``avg_pool`` take ``[N, *spatial, C]`` (or channels-first) inputs. ``pool_size``
and ``strides`` are each an int or one int per spatial dimension; ``strides`` defaults to
``pool_size`` as in Keras; a ``valid`` window larger than the input raises, as Keras' shape
inference does. ``"same"`` average pooling divides by the number of real (unpadded) pixels in
each window, as Keras' JAX backend does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cnnlab import backend
from cnnlab.functional._args import check_output_size, normalize_tuple, spatial_axes

Array = jax.Array


def _window(
    x: Array, pool_size, strides, padding: str, data_format: str | None
) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    n = x.ndim - 2
    if n < 1:
        raise ValueError(f"Pooling expects [batch, *spatial, channels] inputs, got shape {x.shape}.")
    data_format = backend.standardize_data_format(data_format)
    pool = normalize_tuple(pool_size, n, "pool_size")
    stride = pool if strides is None else normalize_tuple(strides, n, "strides")
    mode = str(padding).lower()
    if mode not in ("valid", "same"):
        raise ValueError(f"Invalid padding={padding!r} for pooling: expected 'valid' or 'same'.")
    if mode == "valid":
        sizes = [x.shape[a] for a in spatial_axes(n, data_format)]
        check_output_size(x.shape, sizes, pool, stride, f"pool_size={pool}, strides={stride}")
    if data_format == "channels_last":
        dims, strides_full = (1, *pool, 1), (1, *stride, 1)
    else:
        dims, strides_full = (1, 1, *pool), (1, 1, *stride)
    return dims, strides_full, mode.upper()


def _max(x: Array, dims, strides, pad) -> Array:
    # Python-scalar identities let JAX recognise the monoid (and differentiate the pooling).
    init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
    return lax.reduce_window(x, init, lax.max, dims, strides, pad)


def _mean(x: Array, dims, strides, pad) -> Array:
    summed = lax.reduce_window(x, 0.0, lax.add, dims, strides, pad)
    if pad == "VALID":
        return summed / math.prod(dims)
    ones = jnp.ones([s if d != 1 else 1 for s, d in zip(x.shape, dims)], x.dtype)
    counts = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pad)
    return summed / counts


def _pooling(name: str, reduce: Callable[..., Array], doc: str) -> Callable[..., Array]:
    """A windowed pooling function with Keras' arguments that reduces each window by ``reduce``."""

    def pool(
        x: Array,
        pool_size: int | Sequence[int] = 2,
        strides: int | Sequence[int] | None = None,
        *,
        padding: str = "valid",
        data_format: str | None = None,
    ) -> Array:
        return reduce(x, *_window(x, pool_size, strides, padding, data_format))

    pool.__name__ = pool.__qualname__ = name
    pool.__doc__ = doc
    return pool


max_pool = _pooling("max_pool", _max, "Max pooling (Keras ``MaxPooling{1,2,3}D``).")
avg_pool = _pooling(
    "avg_pool", _mean, "Average pooling (Keras ``AveragePooling{1,2,3}D``); ``same`` excludes padding."
)


def global_avg_pool(x: Array, *, data_format: str | None = None, keepdims: bool = False) -> Array:
    """Mean over all spatial axes (Keras ``GlobalAveragePooling{1,2,3}D``)."""
    return jnp.mean(x, axis=spatial_axes(x.ndim - 2, data_format), keepdims=keepdims)


def global_max_pool(x: Array, *, data_format: str | None = None, keepdims: bool = False) -> Array:
    """Max over all spatial axes (Keras ``GlobalMaxPooling{1,2,3}D``)."""
    return jnp.max(x, axis=spatial_axes(x.ndim - 2, data_format), keepdims=keepdims)
