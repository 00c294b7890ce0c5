"""Flax (linen) convolution layers with Keras 3's constructor signatures and defaults.

Each module owns its parameters (named as in Keras: ``kernel`` and ``bias``; ``depthwise_kernel``
and ``pointwise_kernel`` for separable convolutions), in Keras' layout, and calls
:mod:`cnnlab.functional` for the computation. Arguments are validated at construction; the
ones that need the input (channels vs ``groups``) at the first call.

>>> import jax, jax.numpy as jnp
>>> from cnnlab import nn
>>> layer = nn.Conv2D(16, 3, strides=2, padding="same", activation="relu",
...                   kernel_regularizer="l2")
>>> variables = layer.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
>>> y, aux = layer.apply(variables, jnp.ones((1, 32, 32, 3)), mutable=["losses"])
>>> y.shape, sorted(aux["losses"])
((1, 16, 16, 16), ['kernel_regularizer'])
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnlab import activations, backend, constraints, initializers, regularizers
from cnnlab import functional as F
from cnnlab.functional._args import (
    check_padding,
    check_padding_mode,
    check_positive_int,
    check_strides_dilation,
    normalize_tuple,
)
from cnnlab.nn.penalties import PenaltiesMixin

Array = jax.Array


_SUFFIX_REGISTRIES = (
    ("_initializer", initializers),
    ("_regularizer", regularizers),
    ("_constraint", constraints),
)


def validate_identifiers(layer: Any) -> None:
    """Resolves every ``activation``, ``*_initializer``, ``*_regularizer`` and ``*_constraint``
    field of ``layer`` once, so that a bad name fails at construction, naming the field."""
    for field in dataclasses.fields(layer):
        if field.name == "activation":
            registry = activations
        else:
            registry = next((r for suffix, r in _SUFFIX_REGISTRIES if field.name.endswith(suffix)), None)
        if registry is None:
            continue
        identifier = getattr(layer, field.name)
        try:
            registry.get(identifier)
        except ValueError as err:
            raise ValueError(
                f"{type(layer).__name__}: invalid {field.name}={identifier!r}: {err}"
            ) from None


def validate_geometry(layer: Any, rank: int) -> None:
    """Checks the window arguments a convolution layer shares (kernel_size, strides,
    dilation_rate, padding, padding_mode, data_format), naming the bad one."""
    normalize_tuple(layer.kernel_size, rank, "kernel_size")
    check_strides_dilation(
        normalize_tuple(layer.strides, rank, "strides"),
        normalize_tuple(layer.dilation_rate, rank, "dilation_rate"),
    )
    check_padding(layer.padding, rank)
    check_padding_mode(getattr(layer, "padding_mode", "zeros"))
    backend.standardize_data_format(layer.data_format)


def channels_of(x: Array, data_format: str | None) -> int:
    """The channel count of ``x`` under ``data_format`` (``None``: the package default)."""
    fmt = backend.standardize_data_format(data_format)
    return x.shape[-1] if fmt == "channels_last" else x.shape[1]


class _Conv(PenaltiesMixin, nn.Module):
    """The shared N-d convolution layer (Keras' ``BaseConv``)."""

    rank: ClassVar[int] = 2

    filters: int
    kernel_size: Any
    strides: Any = 1
    padding: Any = "valid"
    data_format: str | None = None
    dilation_rate: Any = 1
    groups: int = 1
    activation: Any = None
    use_bias: bool = True
    kernel_initializer: Any = "glorot_uniform"
    bias_initializer: Any = "zeros"
    kernel_regularizer: Any = None
    bias_regularizer: Any = None
    activity_regularizer: Any = None
    kernel_constraint: Any = None
    bias_constraint: Any = None
    # Extensions beyond Keras.
    padding_mode: str = "zeros"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.filters, "filters")
        check_positive_int(self.groups, "groups")
        if self.filters % self.groups:
            raise ValueError(
                f"filters={self.filters} must be divisible by groups={self.groups}."
            )
        validate_geometry(self, self.rank)
        validate_identifiers(self)
        super().__post_init__()

    def _weight_specs(self):
        return {
            "kernel": (self.kernel_regularizer, self.kernel_constraint),
            "bias": (self.bias_regularizer, self.bias_constraint),
        }

    def _in_channels(self, x: Array) -> int:
        if x.ndim != self.rank + 2:
            raise ValueError(
                f"{type(self).__name__} expects inputs with {self.rank + 2} dimensions, got shape "
                f"{x.shape}."
            )
        return channels_of(x, self.data_format)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_channels = self._in_channels(x)
        if in_channels % self.groups:
            raise ValueError(
                f"The number of input channels ({in_channels}) must be divisible by "
                f"groups={self.groups} (input shape {x.shape})."
            )
        kernel_size = normalize_tuple(self.kernel_size, self.rank, "kernel_size")
        kernel = self.param(
            "kernel",
            initializers.get(self.kernel_initializer),
            (*kernel_size, in_channels // self.groups, self.filters),
            self.param_dtype,
        )
        params = {"kernel": kernel}
        if self.use_bias:
            params["bias"] = self.param(
                "bias", initializers.get(self.bias_initializer), (self.filters,), self.param_dtype
            )
        self.sow_weight_penalties(params)
        y = F.conv(
            x,
            kernel,
            params.get("bias"),
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
            groups=self.groups,
            activation=self.activation,
            padding_mode=self.padding_mode,
            dtype=self.dtype,
        )
        self.sow_activity_penalty(self.activity_regularizer, y)
        return y


class Conv1D(_Conv):
    """1-D convolution (Keras ``Conv1D``); also accepts ``padding="causal"``."""

    rank: ClassVar[int] = 1


class Conv2D(_Conv):
    """2-D convolution with exactly Keras 3's ``Conv2D`` arguments and defaults.

    Inputs ``[N, H, W, C]`` (or ``[N, C, H, W]`` with ``data_format="channels_first"``);
    parameters ``kernel [kh, kw, C // groups, filters]`` and ``bias [filters]``. Extensions:
    explicit ``padding`` (ints or pairs), ``padding_mode`` (``reflect``, ``symmetric``,
    ``circular``, ``edge``), ``dtype`` (compute) and ``param_dtype`` (storage).
    """

    rank: ClassVar[int] = 2
    strides: Any = (1, 1)
    dilation_rate: Any = (1, 1)


class Conv3D(_Conv):
    """3-D convolution (Keras ``Conv3D``)."""

    rank: ClassVar[int] = 3
    strides: Any = (1, 1, 1)
    dilation_rate: Any = (1, 1, 1)


class DepthwiseConv2D(PenaltiesMixin, nn.Module):
    """Depthwise 2-D convolution (Keras ``DepthwiseConv2D``); parameter ``kernel`` is
    ``[kh, kw, C, depth_multiplier]``."""

    kernel_size: Any
    strides: Any = (1, 1)
    padding: Any = "valid"
    depth_multiplier: int = 1
    data_format: str | None = None
    dilation_rate: Any = (1, 1)
    activation: Any = None
    use_bias: bool = True
    depthwise_initializer: Any = "glorot_uniform"
    bias_initializer: Any = "zeros"
    depthwise_regularizer: Any = None
    bias_regularizer: Any = None
    activity_regularizer: Any = None
    depthwise_constraint: Any = None
    bias_constraint: Any = None
    padding_mode: str = "zeros"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.depth_multiplier, "depth_multiplier")
        validate_geometry(self, 2)
        validate_identifiers(self)
        super().__post_init__()

    def _weight_specs(self):
        return {
            "kernel": (self.depthwise_regularizer, self.depthwise_constraint),
            "bias": (self.bias_regularizer, self.bias_constraint),
        }

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = channels_of(x, self.data_format)
        kernel = self.param(
            "kernel",
            initializers.get(self.depthwise_initializer),
            (*normalize_tuple(self.kernel_size, 2, "kernel_size"), channels, self.depth_multiplier),
            self.param_dtype,
        )
        params = {"kernel": kernel}
        if self.use_bias:
            params["bias"] = self.param(
                "bias",
                initializers.get(self.bias_initializer),
                (channels * self.depth_multiplier,),
                self.param_dtype,
            )
        self.sow_weight_penalties(params)
        y = F.depthwise_conv(
            x,
            kernel,
            params.get("bias"),
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
            activation=self.activation,
            padding_mode=self.padding_mode,
            dtype=self.dtype,
        )
        self.sow_activity_penalty(self.activity_regularizer, y)
        return y


class SeparableConv2D(PenaltiesMixin, nn.Module):
    """Depthwise-separable 2-D convolution (Keras ``SeparableConv2D``)."""

    filters: int
    kernel_size: Any
    strides: Any = (1, 1)
    padding: Any = "valid"
    data_format: str | None = None
    dilation_rate: Any = (1, 1)
    depth_multiplier: int = 1
    activation: Any = None
    use_bias: bool = True
    depthwise_initializer: Any = "glorot_uniform"
    pointwise_initializer: Any = "glorot_uniform"
    bias_initializer: Any = "zeros"
    depthwise_regularizer: Any = None
    pointwise_regularizer: Any = None
    bias_regularizer: Any = None
    activity_regularizer: Any = None
    depthwise_constraint: Any = None
    pointwise_constraint: Any = None
    bias_constraint: Any = None
    padding_mode: str = "zeros"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        check_positive_int(self.filters, "filters")
        check_positive_int(self.depth_multiplier, "depth_multiplier")
        validate_geometry(self, 2)
        validate_identifiers(self)
        super().__post_init__()

    def _weight_specs(self):
        return {
            "depthwise_kernel": (self.depthwise_regularizer, self.depthwise_constraint),
            "pointwise_kernel": (self.pointwise_regularizer, self.pointwise_constraint),
            "bias": (self.bias_regularizer, self.bias_constraint),
        }

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = channels_of(x, self.data_format)
        ks = normalize_tuple(self.kernel_size, 2, "kernel_size")
        params = {
            "depthwise_kernel": self.param(
                "depthwise_kernel",
                initializers.get(self.depthwise_initializer),
                (*ks, channels, self.depth_multiplier),
                self.param_dtype,
            ),
            "pointwise_kernel": self.param(
                "pointwise_kernel",
                initializers.get(self.pointwise_initializer),
                (1, 1, channels * self.depth_multiplier, self.filters),
                self.param_dtype,
            ),
        }
        if self.use_bias:
            params["bias"] = self.param(
                "bias", initializers.get(self.bias_initializer), (self.filters,), self.param_dtype
            )
        self.sow_weight_penalties(params)
        y = F.separable_conv(
            x,
            params["depthwise_kernel"],
            params["pointwise_kernel"],
            params.get("bias"),
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
            activation=self.activation,
            padding_mode=self.padding_mode,
            dtype=self.dtype,
        )
        self.sow_activity_penalty(self.activity_regularizer, y)
        return y


class Conv2DTranspose(PenaltiesMixin, nn.Module):
    """Transposed 2-D convolution (Keras ``Conv2DTranspose``); ``kernel`` is
    ``[kh, kw, filters, C]`` as in Keras."""

    filters: int
    kernel_size: Any
    strides: Any = (1, 1)
    padding: str = "valid"
    output_padding: Any = None
    data_format: str | None = None
    dilation_rate: Any = (1, 1)
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
        check_positive_int(self.filters, "filters")
        normalize_tuple(self.kernel_size, 2, "kernel_size")
        normalize_tuple(self.strides, 2, "strides")
        normalize_tuple(self.dilation_rate, 2, "dilation_rate")
        if check_padding(self.padding, 2) not in ("valid", "same"):
            raise ValueError(
                f"Invalid padding={self.padding!r} for Conv2DTranspose: expected 'valid' or 'same'."
            )
        backend.standardize_data_format(self.data_format)
        validate_identifiers(self)
        super().__post_init__()

    def _weight_specs(self):
        return {
            "kernel": (self.kernel_regularizer, self.kernel_constraint),
            "bias": (self.bias_regularizer, self.bias_constraint),
        }

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = channels_of(x, self.data_format)
        ks = normalize_tuple(self.kernel_size, 2, "kernel_size")
        params = {
            "kernel": self.param(
                "kernel",
                initializers.get(self.kernel_initializer),
                (*ks, self.filters, channels),
                self.param_dtype,
            )
        }
        if self.use_bias:
            params["bias"] = self.param(
                "bias", initializers.get(self.bias_initializer), (self.filters,), self.param_dtype
            )
        self.sow_weight_penalties(params)
        y = F.conv_transpose(
            x,
            params["kernel"],
            params.get("bias"),
            strides=self.strides,
            padding=self.padding,
            output_padding=self.output_padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
            activation=self.activation,
            dtype=self.dtype,
        )
        self.sow_activity_penalty(self.activity_regularizer, y)
        return y
