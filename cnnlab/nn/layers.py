"""The non-convolutional layers the tutorial's networks need, with Keras 3 names and defaults.

``Dense``, ``Activation``, ``Dropout``, ``Flatten``, ``BatchNormalization``, and the pooling
layers. Layers whose behaviour differs between training and inference (``Dropout``,
``BatchNormalization``) take ``training: bool`` in ``__call__``, as Keras' ``call`` does.
Dropout draws from the ``"dropout"`` PRNG stream; batch statistics live in ``"batch_stats"``
as ``moving_mean``/``moving_variance`` (Keras' names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab import activations, backend, initializers
from cnnlab import functional as F
from cnnlab.functional._args import check_positive_int, normalize_tuple
from cnnlab.nn.conv import WeightedLayer, check_input_ndim, validate_identifiers

Array = jax.Array


class Dense(WeightedLayer):
    """Keras ``Dense``: ``activation(x @ kernel + bias)`` on the last axis; ``kernel [in, units]``."""

    op = staticmethod(F.dense)

    units: int
    activation: Any = None
    use_bias: bool = True
    kernel_initializer: Any = "glorot_uniform"
    bias_initializer: Any = "zeros"
    kernel_regularizer: Any = None
    bias_regularizer: Any = None
    activity_regularizer: Any = None
    kernel_constraint: Any = None
    bias_constraint: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.units, "units")
        super().__post_init__()

    def weight_shapes(self, x: Array) -> dict[str, tuple[int, ...]]:
        check_input_ndim(self, x, 2, at_least=True)
        return {"kernel": (x.shape[-1], self.units), "bias": (self.units,)}


class Activation(nn.Module):
    """Keras ``Activation``: applies an activation given by name or callable."""

    activation: Any

    def __post_init__(self) -> None:
        validate_identifiers(self)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        return activations.get(self.activation)(x)


class Dropout(nn.Module):
    """Keras ``Dropout``: inverted dropout in training, identity in inference.

    ``rate`` is a float in [0, 1], or a traced scalar when the module is built inside a traced
    function (packed sweep trials that differ in their dropout rate).
    """

    rate: float | Array
    noise_shape: Any = None
    seed: int | None = None
    rng_collection: str = "dropout"

    def __post_init__(self) -> None:
        if not isinstance(self.rate, jax.Array) and (
            not isinstance(self.rate, (int, float)) or not 0.0 <= float(self.rate) <= 1.0
        ):
            raise ValueError(f"Invalid rate={self.rate!r} for Dropout: expected a float in [0, 1].")
        shape = self.noise_shape
        if shape is not None and (
            isinstance(shape, str)
            or not isinstance(shape, Iterable)
            or any(d is not None and (not isinstance(d, int) or d <= 0) for d in shape)
        ):
            raise ValueError(
                f"Invalid noise_shape={shape!r} for Dropout: expected a tuple of positive ints "
                "or None."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, training: bool = False) -> Array:
        if not training or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
            return x
        return F.dropout(self.make_rng(self.rng_collection), x, self.rate, noise_shape=self.noise_shape)


class Flatten(nn.Module):
    """Keras ``Flatten``: ``[N, ...] -> [N, prod(...)]``; channels-first inputs are moved to
    channels-last first, as Keras does, so weights of the following Dense match."""

    data_format: str | None = None

    def __post_init__(self) -> None:
        backend.standardize_data_format(self.data_format)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        check_input_ndim(self, x, 1, at_least=True)
        if backend.standardize_data_format(self.data_format) == "channels_first" and x.ndim > 2:
            x = jnp.transpose(x, (0, *range(2, x.ndim), 1))
        return jnp.reshape(x, (x.shape[0], -1))


class BatchNormalization(WeightedLayer):
    """Keras ``BatchNormalization`` (momentum 0.99, epsilon 1e-3, ``axis=-1``).

    Parameters ``gamma``/``beta``; statistics ``moving_mean``/``moving_variance`` in the
    ``"batch_stats"`` collection, updated in training as
    ``moving = moving * momentum + batch * (1 - momentum)``. Computes in at least float32.
    """

    weight_fields: ClassVar[dict[str, str]] = {"gamma": "gamma", "beta": "beta"}

    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    beta_initializer: Any = "zeros"
    gamma_initializer: Any = "ones"
    moving_mean_initializer: Any = "zeros"
    moving_variance_initializer: Any = "ones"
    beta_regularizer: Any = None
    gamma_regularizer: Any = None
    beta_constraint: Any = None
    gamma_constraint: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, training: bool = False) -> Array:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or not (
            -x.ndim <= self.axis < x.ndim
        ):
            raise ValueError(
                f"BatchNormalization: invalid axis={self.axis!r} for an input of shape {x.shape}."
            )
        axis = self.axis % x.ndim
        features = (x.shape[axis],)
        out_dtype = x.dtype
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))
        moving_mean, moving_var = (
            self.variable(
                "batch_stats",
                name,
                lambda name=name: initializers.get(getattr(self, f"{name}_initializer"))(
                    jax.random.key(0), features, self.param_dtype
                ),
            )
            for name in ("moving_mean", "moving_variance")
        )
        wanted = {"gamma": self.scale, "beta": self.center}
        params = self.create_weights({name: features for name, on in wanted.items() if on})
        if training:
            y, mean, variance = F.batch_norm_training(
                x, axis=axis, gamma=params.get("gamma"), beta=params.get("beta"), epsilon=self.epsilon
            )
            if not self.is_initializing():
                m = self.momentum
                moving_mean.value = moving_mean.value * m + mean * (1.0 - m)
                moving_var.value = moving_var.value * m + variance * (1.0 - m)
            return y.astype(out_dtype)
        mean, variance = moving_mean.value, moving_var.value
        y = F.batch_norm(
            x,
            mean.astype(x.dtype),
            variance.astype(x.dtype),
            axis=axis,
            gamma=params.get("gamma"),
            beta=params.get("beta"),
            epsilon=self.epsilon,
        )
        return y.astype(out_dtype)


class _Pooling(nn.Module):
    """The windowed pooling layers: ``op(x, pool_size, strides, padding=, data_format=)``, with
    ``pool_size`` and ``strides`` each an int or ``rank`` ints (Keras' ``BasePooling``)."""

    op: ClassVar[Callable[..., Array]]
    rank: ClassVar[int] = 2

    pool_size: Any = (2, 2)
    strides: Any = None
    padding: str = "valid"
    data_format: str | None = None

    def __post_init__(self) -> None:
        normalize_tuple(self.pool_size, self.rank, "pool_size")
        if self.strides is not None:
            normalize_tuple(self.strides, self.rank, "strides")
        if str(self.padding).lower() not in ("valid", "same"):
            raise ValueError(f"Invalid padding={self.padding!r}: expected 'valid' or 'same'.")
        backend.standardize_data_format(self.data_format)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        check_input_ndim(self, x, self.rank + 2)
        try:
            return self.op(
                x, self.pool_size, self.strides, padding=self.padding, data_format=self.data_format
            )
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None


class MaxPooling2D(_Pooling):
    """Keras ``MaxPooling2D`` (``strides`` defaults to ``pool_size``)."""

    op = staticmethod(F.max_pool)


class AveragePooling2D(_Pooling):
    """Keras ``AveragePooling2D``; ``"same"`` averages over the unpadded pixels only."""

    op = staticmethod(F.avg_pool)


class _GlobalPooling(nn.Module):
    """Keras' ``BaseGlobalPooling``: ``op`` over every spatial axis of a 4-D input."""

    op: ClassVar[Callable[..., Array]]

    data_format: str | None = None
    keepdims: bool = False

    def __post_init__(self) -> None:
        backend.standardize_data_format(self.data_format)
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        check_input_ndim(self, x, 4)
        return self.op(x, data_format=self.data_format, keepdims=self.keepdims)


class GlobalAveragePooling2D(_GlobalPooling):
    """Keras ``GlobalAveragePooling2D``: mean over H and W."""

    op = staticmethod(F.global_avg_pool)


class GlobalMaxPooling2D(_GlobalPooling):
    """Keras ``GlobalMaxPooling2D``: max over H and W."""

    op = staticmethod(F.global_max_pool)


# --------------------------------------------------------------------------- more Keras layers


class ReLU(nn.Module):
    """Keras ``ReLU``: :func:`cnnlab.activations.relu` with ``max_value``, ``negative_slope``
    and ``threshold`` (``ReLU(6.0)`` is relu6)."""

    max_value: float | None = None
    negative_slope: float = 0.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_value", "negative_slope", "threshold"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Invalid {name}={value!r} for ReLU: expected a value >= 0.")
        super().__post_init__()

    def __call__(self, x: Array) -> Array:
        return activations.relu(x, negative_slope=self.negative_slope, max_value=self.max_value,
                                threshold=self.threshold)


class LeakyReLU(nn.Module):
    """Keras ``LeakyReLU``: ``x`` for ``x >= 0``, else ``negative_slope * x`` (layer default 0.3)."""

    negative_slope: float = 0.3

    def __call__(self, x: Array) -> Array:
        return activations.leaky_relu(x, negative_slope=self.negative_slope)


class Softmax(nn.Module):
    """Keras ``Softmax`` over ``axis`` (an int or a tuple of ints)."""

    axis: Any = -1

    def __call__(self, x: Array) -> Array:
        return activations.softmax(x, axis=self.axis)


class Rescaling(nn.Module):
    """Keras ``Rescaling``: ``x * scale + offset`` in at least float32; ``scale`` and ``offset``
    may be per-channel sequences (last axis, or the channel axis for channels_first images)."""

    scale: Any = 1.0
    offset: Any = 0.0

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))
        scale = jnp.asarray(self.scale, x.dtype)
        offset = jnp.asarray(self.offset, x.dtype)
        if scale.ndim and backend.image_data_format() == "channels_first":
            scale = jnp.reshape(scale, scale.shape + (1,) * (3 - scale.ndim))
        return x * scale + offset


def _axes(axis: Any, ndim: int, name: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if any(isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
        raise ValueError(f"{name}: invalid axis={axis!r} for an input of rank {ndim}.")
    return tuple(sorted(a % ndim for a in axes))


class LayerNormalization(WeightedLayer):
    """Keras ``LayerNormalization`` (``epsilon=1e-3``, ``axis=-1``): each example normalized
    over ``axis`` by its own mean and variance, then ``* gamma + beta`` (shape of those axes).
    Same operation order as Keras' ``ops.layer_normalization``; at least float32 inside."""

    weight_fields: ClassVar[dict[str, str]] = {"gamma": "gamma", "beta": "beta"}

    axis: Any = -1
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    rms_scaling: bool = False
    beta_initializer: Any = "zeros"
    gamma_initializer: Any = "ones"
    beta_regularizer: Any = None
    gamma_regularizer: Any = None
    beta_constraint: Any = None
    gamma_constraint: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axes = _axes(self.axis, x.ndim, "LayerNormalization")
        features = tuple(x.shape[a] for a in axes)
        wanted = {"gamma": self.scale, "beta": self.center and not self.rms_scaling}
        params = self.create_weights({name: features for name, on in wanted.items() if on})
        out_dtype = x.dtype
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))
        shape = [x.shape[d] if d in axes else 1 for d in range(x.ndim)]

        def broadcast(v):
            return None if v is None else jnp.reshape(v.astype(x.dtype), shape)

        gamma, beta = broadcast(params.get("gamma")), broadcast(params.get("beta"))
        variance = jnp.var(x, axis=axes, keepdims=True)
        inv = jax.lax.rsqrt(variance + self.epsilon)
        if self.rms_scaling:
            y = x * inv if gamma is None else x * inv * gamma
            return y.astype(out_dtype)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        if gamma is not None:
            inv = inv * gamma
        res = -mean * inv
        if beta is not None:
            res = res + beta
        return (x * inv + res).astype(out_dtype)


class Normalization(nn.Module):
    """Keras ``Normalization``: ``(x - mean) / max(sqrt(variance), 1e-7)`` per ``axis``
    (``invert=True``: ``mean + x * max(sqrt(variance), 1e-7)``).

    ``mean`` and ``variance`` given (a number or one per entry of ``axis``) are constants;
    otherwise they are the ``mean``/``variance`` entries of the ``"batch_stats"`` collection
    (zeros and ones until set, e.g. from an adapted Keras layer); training never changes them.
    """

    axis: Any = -1
    mean: Any = None
    variance: Any = None
    invert: bool = False

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.variance is None):
            raise ValueError("Normalization: give both mean and variance, or neither.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        keep = () if self.axis is None else _axes(self.axis, x.ndim, "Normalization")
        shape = [x.shape[d] if d in keep else 1 for d in range(x.ndim)]
        stats_shape = tuple(x.shape[d] for d in keep)
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))
        if self.mean is None:
            mean = self.variable("batch_stats", "mean", jnp.zeros, stats_shape, jnp.float32).value
            variance = self.variable("batch_stats", "variance", jnp.ones, stats_shape, jnp.float32).value
        else:
            mean, variance = (jnp.broadcast_to(np.asarray(v, np.float32), stats_shape)
                              for v in (self.mean, self.variance))
        mean = jnp.reshape(mean, shape).astype(x.dtype)
        std = jnp.maximum(jnp.sqrt(jnp.reshape(variance, shape).astype(x.dtype)), 1e-7)
        return mean + x * std if self.invert else (x - mean) / std


class SpatialDropout2D(nn.Module):
    """Keras ``SpatialDropout2D``: drops whole channels (noise shape ``[N, 1, 1, C]``) in
    training, identity in inference."""

    rate: float | Array
    data_format: str | None = None
    seed: int | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: Array, training: bool = False) -> Array:
        check_input_ndim(self, x, 4)
        if not training or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
            return x
        if backend.standardize_data_format(self.data_format) == "channels_first":
            noise_shape = (x.shape[0], x.shape[1], 1, 1)
        else:
            noise_shape = (x.shape[0], 1, 1, x.shape[3])
        return F.dropout(self.make_rng(self.rng_collection), x, self.rate, noise_shape=noise_shape)
