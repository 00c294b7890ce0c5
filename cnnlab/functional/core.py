"""Dense, dropout and batch normalization as pure JAX functions with Keras 3 semantics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from cnnlab import activations as activations_lib

Array = jax.Array


def dense(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    activation: Any = None,
    dtype: Any = None,
    precision: Any = None,
) -> Array:
    """``activation(x @ kernel + bias)`` on the last axis; ``kernel`` is ``[in, units]``."""
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"Input of shape {x.shape} has {x.shape[-1]} features but the kernel of shape "
            f"{kernel.shape} expects {kernel.shape[0]}."
        )
    compute_dtype = kernel.dtype if dtype is None else jnp.dtype(dtype)
    y = jnp.matmul(jnp.asarray(x, compute_dtype), kernel.astype(compute_dtype), precision=precision)
    return bias_activation(y, bias, activation)


def bias_activation(y: Array, bias: Array | None, activation: Any, *, axis: int = -1) -> Array:
    """Adds ``bias`` on the channel ``axis`` (-1 or 1) and applies ``activation``, as a Keras
    layer does after its kernel."""
    if bias is not None:
        if axis == 1:
            bias = jnp.reshape(bias, (1, -1) + (1,) * (y.ndim - 2))
        y = y + bias.astype(y.dtype)
    if activation is not None:
        y = activations_lib.get(activation)(y)
    return y


def dropout(
    key: Array | None,
    x: Array,
    rate: float | Array,
    *,
    noise_shape: Sequence[int | None] | None = None,
    deterministic: bool = False,
) -> Array:
    """Inverted dropout as Keras: keep with probability ``1 - rate`` and scale by its inverse.

    ``noise_shape`` entries of ``None`` take the input's size (Keras convention). ``rate`` may be
    a traced scalar (e.g. one per packed sweep trial): then the mask is drawn even at rate 0
    (where it keeps everything), and a Python rate and the same traced rate give the same bits.
    """
    traced = isinstance(rate, jax.Array)
    if not traced:
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"Invalid dropout rate={rate!r}: expected a float in [0, 1].")
        if deterministic or rate == 0.0:
            return x
        if rate == 1.0:
            return jnp.zeros_like(x)
    elif deterministic:
        return x
    if key is None:
        raise ValueError("dropout needs a PRNG key when deterministic=False and rate > 0.")
    shape = x.shape
    if noise_shape is not None:
        if len(noise_shape) != x.ndim:
            raise ValueError(
                f"noise_shape={tuple(noise_shape)} needs one entry per input dimension, but the "
                f"input has shape {x.shape}."
            )
        shape = tuple(s if n is None else n for s, n in zip(x.shape, noise_shape))
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    keep = bernoulli(key, keep_prob, shape)
    # At rate 1 nothing is kept; dividing by 1 there keeps the gradient finite.
    scale = jnp.where(keep_prob > 0, keep_prob, 1.0).astype(x.dtype)
    return jnp.where(keep, x / scale, jnp.zeros_like(x))


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 hash (20 rounds) exactly as ``jax.random`` computes it, written out.

    JAX lowers its hash on CPU as a rolled 5-iteration loop, so XLA writes and reads both
    words of the whole array between iterations; unrolled, the hash, the comparison and the
    select of a dropout mask become one elementwise pass.
    """
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _fusable_threefry_key(key: Array) -> Array | None:
    """The key's two uint32 words when ``jax.random`` would draw its bits with the
    partitionable Threefry-2x32 scheme (JAX's default), else ``None``."""
    if not jax.config.jax_threefry_partitionable:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32" or key.shape != ():
            return None
        return jax.random.key_data(key)
    if key.dtype == jnp.uint32 and key.shape == (2,) and jax.config.jax_default_prng_impl == "threefry2x32":
        return key
    return None


def bernoulli(key: Array, p: Array, shape: Sequence[int]) -> Array:
    """``jax.random.bernoulli(key, p, shape)``, bit for bit, computed in one elementwise pass.

    Same bits as ``jax.random`` (``bits = h1 ^ h2`` of Threefry on the element's flat index,
    the uniform from the top 23 bits, ``u < p``); keys of other generators, a ``p`` that is not
    float32 and arrays of 2**32 elements or more go through ``jax.random.bernoulli`` itself.
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    words = _fusable_threefry_key(key)
    p = jnp.asarray(p)
    # jax.random draws its uniform in p's float type: only float32 has the 23-bit form below.
    if words is None or size >= 2**32 or size == 0 or p.dtype != jnp.float32:
        return jax.random.bernoulli(key, p, shape)
    lo = jax.lax.iota(jnp.uint32, size).reshape(shape)
    h1, h2 = _threefry2x32(words[0], words[1], jnp.zeros_like(lo), lo)
    bits = h1 ^ h2
    mantissa = (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
    uniform = jnp.maximum(0.0, jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0)
    return uniform < p


def moments(x: Array, axes: Sequence[int]) -> tuple[Array, Array]:
    """Mean and (biased) variance over ``axes``; low-precision inputs are reduced in float32."""
    dtype = x.dtype
    if dtype in (jnp.float16, jnp.bfloat16):
        x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=tuple(axes))
    variance = jnp.var(x, axis=tuple(axes))
    return mean.astype(dtype), variance.astype(dtype)


def batch_norm(
    x: Array,
    mean: Array,
    variance: Array,
    *,
    axis: int = -1,
    gamma: Array | None = None,
    beta: Array | None = None,
    epsilon: float = 1e-3,
) -> Array:
    """Keras' ``ops.batch_normalization``: ``x * inv + (beta - mean * inv)``, ``inv = gamma / sqrt(var + eps)``."""
    shape = [1] * x.ndim
    shape[axis] = mean.shape[0]
    inv = jax.lax.rsqrt(jnp.reshape(variance, shape) + epsilon)
    if gamma is not None:
        inv = inv * jnp.reshape(gamma, shape)
    res = -jnp.reshape(mean, shape) * inv
    if beta is not None:
        res = res + jnp.reshape(beta, shape)
    return x * inv.astype(x.dtype) + res.astype(x.dtype)


def batch_norm_training(
    x: Array,
    *,
    axis: int = -1,
    gamma: Array | None = None,
    beta: Array | None = None,
    epsilon: float | Array = 1e-3,
) -> tuple[Array, Array, Array]:
    """Training-mode batch normalization: ``(batch_norm(x, mean, var, ...), mean, var)`` with
    the batch's :func:`moments` over every axis but ``axis``.

    The forward pass is :func:`moments` followed by :func:`batch_norm`, bit for bit. The
    gradient is the closed form (one reduction pass over ``dy`` and ``x``, then one elementwise
    pass), not autodiff through the mean and variance, which costs XLA several more passes over
    the activation; it equals autodiff's up to float rounding, cotangents of the returned
    ``mean`` and ``var`` included.
    """
    axis = axis % x.ndim
    return _batch_norm_training(axis, x, gamma, beta, epsilon)


def _bn_forward(axis, x, gamma, beta, epsilon):
    axes = [a for a in range(x.ndim) if a != axis]
    mean, variance = moments(x, axes)
    y = batch_norm(x, mean, variance, axis=axis, gamma=gamma, beta=beta, epsilon=epsilon)
    return y, mean, variance


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_norm_training(axis, x, gamma, beta, epsilon):
    return _bn_forward(axis, x, gamma, beta, epsilon)


def _batch_norm_training_fwd(axis, x, gamma, beta, epsilon):
    y, mean, variance = _bn_forward(axis, x, gamma, beta, epsilon)
    return (y, mean, variance), (x, mean, variance, gamma, beta, epsilon)


def _batch_norm_training_bwd(axis, residuals, cotangents):
    x, mean, variance, gamma, beta, epsilon = residuals
    dy, d_mean, d_var = cotangents
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    count = math.prod(x.shape[a] for a in axes)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xf, dyf = x.astype(compute), dy.astype(compute)
    rstd = jax.lax.rsqrt(variance.astype(compute) + jnp.asarray(epsilon, compute))
    g = rstd if gamma is None else rstd * gamma.astype(compute)
    centered = xf - jnp.reshape(mean.astype(compute), shape)
    sum_dy = jnp.sum(dyf, axis=axes)
    sum_dy_centered = jnp.sum(dyf * centered, axis=axes)
    # y = centered * g + beta with mean and variance functions of x: the mean's total
    # cotangent is d_mean - g * sum(dy); the variance's is d_var - 0.5 * gamma * rstd^3 *
    # sum(dy * centered), and d var / d x = 2 * centered / count.
    epsilon_bar = -0.5 * g * rstd * rstd * sum_dy_centered  # y's variance enters as var + eps
    mean_bar = d_mean.astype(compute) - g * sum_dy
    var_bar = d_var.astype(compute) + epsilon_bar
    dx = (dyf * jnp.reshape(g, shape) + jnp.reshape(mean_bar / count, shape)
          + centered * jnp.reshape(var_bar * (2.0 / count), shape))
    d_gamma = None if gamma is None else (sum_dy_centered * rstd).astype(gamma.dtype)
    d_beta = None if beta is None else sum_dy.astype(beta.dtype)
    d_epsilon = jnp.sum(epsilon_bar).astype(jnp.result_type(epsilon))
    return dx.astype(x.dtype), d_gamma, d_beta, d_epsilon


_batch_norm_training.defvjp(_batch_norm_training_fwd, _batch_norm_training_bwd)
