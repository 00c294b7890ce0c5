"""Dense, dropout and batch normalization as pure JAX functions with Keras 3 semantics."""

from __future__ import annotations

from collections.abc import Sequence
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
    keep = jax.random.bernoulli(key, keep_prob, shape)
    # At rate 1 nothing is kept; dividing by 1 there keeps the gradient finite.
    scale = jnp.where(keep_prob > 0, keep_prob, 1.0).astype(x.dtype)
    return jnp.where(keep, x / scale, jnp.zeros_like(x))


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
