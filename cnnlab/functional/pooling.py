"""Keras-exact pooling as pure JAX functions on ``jax.lax.reduce_window``.

``max_pool``/``avg_pool`` take ``[N, *spatial, C]`` (or channels-first) inputs. ``pool_size``
and ``strides`` are each an int or one int per spatial dimension; ``strides`` defaults to
``pool_size`` as in Keras; a ``valid`` window larger than the input raises, as Keras' shape
inference does. ``"same"`` average pooling divides by the number of real (unpadded) pixels in
each window, as Keras' JAX backend does.

On the CPU backend, floating-point max pooling with windows of up to ``_SLICE_TAPS`` taps is
computed as the maximum of the window's strided slices (one fused loop) instead of XLA's
``reduce-window``, and differentiated by a ``custom_jvp`` that routes each window's tangent to
its first maximal tap in row-major order: the values and the gradients (ties included) are
those of ``reduce-window`` and XLA's ``select-and-scatter``, bit for bit, at a fraction of their
cost on XLA:CPU (experiments/bench/README.md). A bfloat16 (or float16) input is pooled in
float32, exactly, and its gradient sums the overlapping windows' cotangents in float32 and
rounds once, where ``select-and-scatter`` rounds after each add. Forward- and reverse-mode
both work.
:func:`reduce_window_max_pooling` keeps XLA's op instead, for exporters that map it to one
``MaxPool``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

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


#: The largest window (taps) pooled by strided slices; a larger one is XLA's reduce-window.
_SLICE_TAPS = 27
_reduce_window_only = contextvars.ContextVar("cnnlab_max_pool_reduce_window", default=False)


@contextlib.contextmanager
def reduce_window_max_pooling() -> Iterator[None]:
    """Max pooling traced in the block is XLA's ``reduce-window`` on every backend (what an
    exporter maps to one ``MaxPool``; the values are the same)."""
    token = _reduce_window_only.set(True)
    try:
        yield
    finally:
        _reduce_window_only.reset(token)


def _max(x: Array, dims, strides, pad) -> Array:
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    if (floating and math.prod(dims) <= _SLICE_TAPS and jax.default_backend() == "cpu"
            and not _reduce_window_only.get()):
        return _max_by_slices(x, tuple(dims), tuple(strides), pad)
    # Python-scalar identities let JAX recognise the monoid (and differentiate the pooling).
    init = -jnp.inf if floating else int(jnp.iinfo(x.dtype).min)
    return lax.reduce_window(x, init, lax.max, dims, strides, pad)


def _taps(x: Array, fill: Array, dims, strides, pad) -> list[Array]:
    """Each window tap's strided slice of ``x`` padded with ``fill``, in row-major tap order:
    slice ``k`` holds tap ``k`` of every output window."""
    pads = lax.padtype_to_pads(x.shape, dims, strides, pad)
    xp = lax.pad(x, fill, [(lo, hi, 0) for lo, hi in pads])
    out = [(n - d) // s + 1 for n, d, s in zip(xp.shape, dims, strides)]
    return [lax.slice(xp, offs, [o + s * (m - 1) + 1 for o, s, m in zip(offs, strides, out)], strides)
            for offs in itertools.product(*(range(d) for d in dims))]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_by_slices(x: Array, dims, strides, pad) -> Array:
    return functools.reduce(lax.max, _float32_taps(x, -jnp.inf, dims, strides, pad)).astype(x.dtype)


def _float32_taps(x: Array, fill: float, dims, strides, pad) -> list[Array]:
    """:func:`_taps` of ``x`` (padded with ``fill``) in at least float32. A maximum or an
    equality of bfloat16 values is exact in float32, and so is a sum of bfloat16 taps of which
    one is nonzero; XLA:CPU would otherwise round every intermediate result back to bfloat16,
    element by element."""
    work = jnp.promote_types(x.dtype, jnp.float32)
    return _taps(x.astype(work), jnp.array(fill, work), dims, strides, pad)


@_max_by_slices.defjvp
def _max_by_slices_jvp(dims, strides, pad, primals, tangents):
    (x,), (t,) = primals, tangents
    taps = _float32_taps(x, -jnp.inf, dims, strides, pad)
    y = functools.reduce(lax.max, taps)
    # Each window's first maximal tap in row-major order, as select-and-scatter picks it (-1
    # where no tap equals the maximum: a NaN window, which gets no tangent).
    first = jnp.full(y.shape, -1, jnp.int8)
    for k in reversed(range(len(taps))):
        first = jnp.where(taps[k] == y, jnp.int8(k), first)
    # A low-precision tangent is routed in float32 (exactly: one tap per window is nonzero), so
    # that its transpose adds the overlapping windows' cotangents in float32 and rounds once,
    # instead of a bfloat16 rounding after each of the window's taps (XLA:CPU emulates those
    # roundings element by element).
    tangent_taps = _float32_taps(t, 0.0, dims, strides, pad)
    zero = jnp.zeros((), tangent_taps[0].dtype)
    y_dot = jnp.zeros(y.shape, zero.dtype)
    for k, ts in enumerate(tangent_taps):
        y_dot = y_dot + jnp.where(first == k, ts, zero)
    return y.astype(x.dtype), y_dot.astype(t.dtype)


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
