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
