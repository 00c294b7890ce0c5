"""Flax (linen) convolution layers with Keras 3's constructor signatures and defaults.

Each module owns its parameters (named as in Keras: ``kernel`` and ``bias``; ``depthwise_kernel``
and ``pointwise_kernel`` for separable convolutions), in Keras' layout, and calls
:mod:`cnnlab.functional` for the computation. Arguments are validated at construction; the
ones that need the input (channels vs ``groups``) at the first call. :class:`WeightedLayer` is
the base of every cnnlab layer with weights (``Dense`` and ``BatchNormalization`` too).

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
import inspect
from collections.abc import Callable
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
    check_transpose_padding,
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


def check_input_ndim(layer: Any, x: Array, ndim: int, *, at_least: bool = False) -> None:
    """Keras' ``InputSpec(ndim=...)`` (or ``min_ndim`` with ``at_least``), checked at the call."""
    if x.ndim < ndim if at_least else x.ndim != ndim:
        want = f"at least {ndim}" if at_least else ndim
        raise ValueError(
            f"{type(layer).__name__} expects inputs with {want} dimensions, got shape {x.shape}."
        )


def channels_of(x: Array, data_format: str | None) -> int:
    """The channel count of ``x`` under ``data_format`` (``None``: the package default)."""
    fmt = backend.standardize_data_format(data_format)
    return x.shape[-1] if fmt == "channels_last" else x.shape[1]


class WeightedLayer(PenaltiesMixin, nn.Module):
    """Base of the layers that own weights (Keras' ``add_weight`` plus ``layer.call``).

    A subclass names its weights in ``weight_fields`` as ``{param_name: field_prefix}``; each
    weight is set up by the fields ``<prefix>_initializer``, ``<prefix>_regularizer`` and
    ``<prefix>_constraint``, and ``bias`` exists only with ``use_bias``. The default
    ``__call__`` creates the weights of ``weight_shapes(x)`` and returns
    ``op(x, *weights, **options)``, where the options are the layer's fields that ``op`` takes by
    the same keyword (``strides``, ``padding``, ``activation``, ``dtype``...); its errors are
    prefixed by the layer's class name.
    """

    weight_fields: ClassVar[dict[str, str]] = {"kernel": "kernel", "bias": "bias"}
    op: ClassVar[Callable[..., Array]]

    def __post_init__(self) -> None:
        validate_identifiers(self)
        super().__post_init__()

    def _weight_specs(self):
        return {
            name: (getattr(self, f"{prefix}_regularizer"), getattr(self, f"{prefix}_constraint"))
            for name, prefix in self.weight_fields.items()
        }

    def weight_shapes(self, x: Array) -> dict[str, tuple[int, ...]]:
        """``{param_name: shape}`` for input ``x``, in creation order."""
        raise NotImplementedError

    def create_weights(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Array]:
        """Creates the weights of ``shapes`` (in order, so PRNG draws are stable) and sows
        their penalties."""
        params = {}
        for name, shape in shapes.items():
            if name == "bias" and not self.use_bias:
                continue
            init = initializers.get(getattr(self, f"{self.weight_fields[name]}_initializer"))
            params[name] = self.param(name, init, shape, self.param_dtype)
        self.sow_weight_penalties(params)
        return params

    @nn.compact
    def __call__(self, x: Array) -> Array:
        params = self.create_weights(self.weight_shapes(x))
        keywords = inspect.signature(self.op).parameters
        options = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in keywords and keywords[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        }
        try:
            y = self.op(x, *(params.get(name) for name in self.weight_fields), **options)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from None
        self.sow_activity_penalty(self.activity_regularizer, y)
        return y


class _ConvLayer(WeightedLayer):
    """Base of the convolution layers: checks the arguments at construction and derives the
    weight shapes from the input's channels and the kernel size."""

    rank: ClassVar[int] = 2
    # Keras' depthwise and separable layers accept strides > 1 with dilation_rate > 1.
    strided_dilation: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in ("filters", "groups", "depth_multiplier"):
            if hasattr(self, name):
                check_positive_int(getattr(self, name), name)
        if hasattr(self, "groups") and self.filters % self.groups:
            raise ValueError(
                f"filters={self.filters} must be divisible by groups={self.groups}."
            )
        self.check_geometry()
        super().__post_init__()

    def check_geometry(self) -> None:
        """Checks the window arguments (kernel_size, strides, dilation_rate, padding,
        padding_mode or output_padding, data_format) as Keras' constructors do, naming the bad
        one."""
        normalize_tuple(self.kernel_size, self.rank, "kernel_size")
        strides = normalize_tuple(self.strides, self.rank, "strides")
        dilation_rate = normalize_tuple(self.dilation_rate, self.rank, "dilation_rate")
        if not self.strided_dilation:
            check_strides_dilation(strides, dilation_rate)
        backend.standardize_data_format(self.data_format)
        if hasattr(self, "output_padding"):
            check_transpose_padding(self.padding, self.output_padding, strides)
        else:
            check_padding(self.padding, self.rank)
            check_padding_mode(self.padding_mode)

    def weight_shapes(self, x: Array) -> dict[str, tuple[int, ...]]:
        check_input_ndim(self, x, self.rank + 2)
        channels, groups = channels_of(x, self.data_format), getattr(self, "groups", 1)
        if channels % groups:
            raise ValueError(
                f"{type(self).__name__}: the number of input channels ({channels}) must be "
                f"divisible by groups={groups} (input shape {x.shape})."
            )
        kernel_size = normalize_tuple(self.kernel_size, self.rank, "kernel_size")
        return self.conv_weight_shapes(channels, kernel_size)

    def conv_weight_shapes(
        self, channels: int, kernel_size: tuple[int, ...]
    ) -> dict[str, tuple[int, ...]]:
        """The weight shapes for ``channels`` input channels."""
        raise NotImplementedError


class _Conv(_ConvLayer):
    """The shared N-d convolution layer (Keras' ``BaseConv``)."""

    op = staticmethod(F.conv)

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

    def conv_weight_shapes(self, channels, kernel_size):
        return {
            "kernel": (*kernel_size, channels // self.groups, self.filters),
            "bias": (self.filters,),
        }


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


class DepthwiseConv2D(_ConvLayer):
    """Depthwise 2-D convolution (Keras ``DepthwiseConv2D``); parameter ``kernel`` is
    ``[kh, kw, C, depth_multiplier]``."""

    weight_fields: ClassVar[dict[str, str]] = {"kernel": "depthwise", "bias": "bias"}
    op = staticmethod(F.depthwise_conv)
    strided_dilation: ClassVar[bool] = True

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

    def conv_weight_shapes(self, channels, kernel_size):
        return {
            "kernel": (*kernel_size, channels, self.depth_multiplier),
            "bias": (channels * self.depth_multiplier,),
        }


class SeparableConv2D(_ConvLayer):
    """Depthwise-separable 2-D convolution (Keras ``SeparableConv2D``)."""

    weight_fields: ClassVar[dict[str, str]] = {
        "depthwise_kernel": "depthwise",
        "pointwise_kernel": "pointwise",
        "bias": "bias",
    }
    op = staticmethod(F.separable_conv)
    strided_dilation: ClassVar[bool] = True

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

    def conv_weight_shapes(self, channels, kernel_size):
        return {
            "depthwise_kernel": (*kernel_size, channels, self.depth_multiplier),
            "pointwise_kernel": (1, 1, channels * self.depth_multiplier, self.filters),
            "bias": (self.filters,),
        }


class Conv2DTranspose(_ConvLayer):
    """Transposed 2-D convolution (Keras ``Conv2DTranspose``); ``kernel`` is
    ``[kh, kw, filters, C]`` as in Keras."""

    op = staticmethod(F.conv_transpose)

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

    def conv_weight_shapes(self, channels, kernel_size):
        return {"kernel": (*kernel_size, self.filters, channels), "bias": (self.filters,)}
