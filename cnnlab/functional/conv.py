"""Keras-exact convolutions as pure JAX functions on ``jax.lax.conv_general_dilated``.

One N-d core, :func:`conv`, implements Keras 3's ``ops.conv`` plus the layer's bias and
activation; ``conv1d``/``conv2d``/``conv3d`` are that core with the rank checked. Kernels use
Keras' layout ``(*kernel_size, in_channels // groups, filters)`` in both data formats, so
weights move between Keras and cnnlab unchanged.

Semantics (matching ``keras/src/backend/jax/nn.py``):

* ``padding="same"`` is XLA's SAME on the dilated kernel ``(k - 1) * d + 1``: for strided
  convolutions the extra pixel goes bottom/right, as TensorFlow does.
* ``data_format="channels_first"`` changes only the input/output dimension numbers.
* ``groups`` maps to ``feature_group_count``.
* ``strides > 1`` with ``dilation_rate > 1`` is allowed, as in ``keras.ops.conv`` (the
  ``cnnlab.nn`` layers reject it where Keras' layers do); a ``valid`` kernel larger than the
  (padded) input raises "Computed output size would be zero or negative", as Keras does.
* The inputs are cast to the compute dtype, which is the kernel's dtype unless ``dtype`` is
  given (e.g. ``jnp.bfloat16`` for mixed precision with float32 parameters).

Beyond Keras: explicit padding (``int``, per-dimension ints or ``(low, high)`` pairs),
``padding_mode`` in ``zeros | reflect | symmetric | circular (wrap) | edge (replicate)``
(the modes PyTorch offers), and ``"causal"`` for 1-D.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cnnlab import backend
from cnnlab import initializers as initializers_lib
from cnnlab.functional._args import (
    Padding,
    check_output_size,
    check_padding,
    check_padding_mode,
    check_positive_int,
    check_transpose_padding,
    normalize_tuple,
    same_padding,
    spatial_axes,
)
from cnnlab.functional.core import bias_activation
from cnnlab.native import conv_impl

Array = jax.Array
ActivationLike = str | Callable[[Array], Array] | None


def _dimension_numbers(n: int, data_format: str) -> lax.ConvDimensionNumbers:
    """Dimension numbers for Keras' kernel layout ``(*spatial, in, out)`` in either format."""
    if data_format == "channels_last":
        lhs = (0, n + 1, *range(1, n + 1))
    else:
        lhs = (0, 1, *range(2, n + 2))
    rhs = (n + 1, n, *range(n))
    return lax.ConvDimensionNumbers(lhs_spec=lhs, rhs_spec=rhs, out_spec=lhs)


def _channel_axis(data_format: str) -> int:
    return -1 if data_format == "channels_last" else 1


def _kernel_channels(x: Array, kernel: Array, axis: int, data_format: str, kind: str) -> int:
    """The input's channel count, checked against the kernel's input-channel ``axis``."""
    channels = x.shape[_channel_axis(data_format)]
    if kernel.shape[axis] != channels:
        raise ValueError(
            f"{kind} kernel of shape {kernel.shape} expects {kernel.shape[axis]} input channels, "
            f"but the input has {channels} (input shape {x.shape})."
        )
    return channels


def _pad_input(
    x: Array, pads: Sequence[tuple[int, int]], data_format: str, mode: str, n: int
) -> Array:
    widths = [(0, 0)] * x.ndim
    for axis, pad in zip(spatial_axes(n, data_format), pads):
        widths[axis] = tuple(pad)
    return jnp.pad(x, widths, mode=mode)


def _resolve_padding(
    x: Array,
    kernel_size: Sequence[int],
    *,
    padding: Padding,
    padding_mode: str,
    strides: Sequence[int],
    dilation_rate: Sequence[int],
    data_format: str,
) -> tuple[Array, str | Sequence[tuple[int, int]]]:
    """Returns the (possibly pre-padded) input and the padding to hand to XLA.

    Zero padding is left to XLA (``"SAME"``/``"VALID"`` strings exactly as Keras passes them);
    other modes pad the input explicitly and then run a VALID convolution.
    """
    n = len(kernel_size)
    pad = check_padding(padding, n)
    mode = check_padding_mode(padding_mode)
    if pad == "causal":
        # Keras' Conv1D: left-pad by the dilated receptive field, then VALID.
        pad = ((dilation_rate[0] * (kernel_size[0] - 1), 0),)
    if mode == "constant":
        if isinstance(pad, str):
            return x, pad.upper()
        return x, pad
    if pad == "valid":
        return x, "VALID"
    if pad == "same":
        sizes = [x.shape[a] for a in spatial_axes(n, data_format)]
        pad = tuple(
            same_padding(s, k, st, d)
            for s, k, st, d in zip(sizes, kernel_size, strides, dilation_rate)
        )
    return _pad_input(x, pad, data_format, mode, n), "VALID"


def conv(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "valid",
    data_format: str | None = None,
    dilation_rate: int | Sequence[int] = 1,
    groups: int = 1,
    activation: ActivationLike = None,
    padding_mode: str = "zeros",
    dtype: Any = None,
    precision: Any = None,
) -> Array:
    """N-d convolution with Keras ``ConvND`` semantics; the core of ``conv1d/2d/3d``.

    Args:
      x: inputs ``[N, *spatial, C]`` (channels_last) or ``[N, C, *spatial]`` (channels_first).
      kernel: ``[*kernel_size, C // groups, filters]`` (Keras' layout in both formats).
      bias: optional ``[filters]``, added after the convolution.
      strides, dilation_rate: int or one int per spatial dimension.
      padding: ``"valid"``, ``"same"``, ``"causal"`` (1-D only), an int, or per-dimension
        ints / ``(low, high)`` pairs.
      data_format: ``"channels_last"``, ``"channels_first"`` or ``None`` for
        ``cnnlab.backend.image_data_format()``.
      groups: number of channel groups (``feature_group_count``).
      activation: Keras activation name, callable, or ``None``.
      padding_mode: how padded pixels are filled: ``zeros`` (Keras), ``reflect``,
        ``symmetric``, ``circular``/``wrap``, ``edge``/``replicate``.
      dtype: compute dtype; defaults to the kernel's dtype (Keras casts inputs to it).
      precision: passed to XLA (e.g. ``jax.lax.Precision.HIGHEST``).

    Returns:
      ``[N, *out_spatial, filters]`` (or channels-first), in the compute dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from cnnlab import functional as F
      >>> x = jnp.ones((2, 8, 8, 3)); k = jnp.ones((3, 3, 3, 4))
      >>> F.conv2d(x, k, padding="same").shape
      (2, 8, 8, 4)
    """
    n = kernel.ndim - 2
    if n < 1:
        raise ValueError(f"kernel must have at least 3 dimensions, got shape {kernel.shape}.")
    if x.ndim != n + 2:
        raise ValueError(
            f"Input of shape {x.shape} does not match a {n}-D kernel of shape {kernel.shape}: "
            f"expected an input with {n + 2} dimensions [batch, *{n} spatial, channels]."
        )
    data_format = backend.standardize_data_format(data_format)
    strides = normalize_tuple(strides, n, "strides")
    dilation_rate = normalize_tuple(dilation_rate, n, "dilation_rate")
    groups = check_positive_int(groups, "groups")
    in_channels = x.shape[_channel_axis(data_format)]
    filters = kernel.shape[-1]
    if in_channels % groups:
        raise ValueError(
            f"The number of input channels ({in_channels}) must be divisible by groups={groups}."
        )
    if filters % groups:
        raise ValueError(f"filters={filters} must be divisible by groups={groups}.")
    if kernel.shape[-2] * groups != in_channels:
        raise ValueError(
            f"kernel of shape {kernel.shape} expects {kernel.shape[-2]} * groups={groups} = "
            f"{kernel.shape[-2] * groups} input channels, but the input has {in_channels} "
            f"(input shape {x.shape}, data_format={data_format!r})."
        )
    compute_dtype = kernel.dtype if dtype is None else jnp.dtype(dtype)
    input_shape = x.shape
    x = jnp.asarray(x, compute_dtype)
    kernel = jnp.asarray(kernel, compute_dtype)
    x, xla_padding = _resolve_padding(
        x,
        kernel.shape[:n],
        padding=padding,
        padding_mode=padding_mode,
        strides=strides,
        dilation_rate=dilation_rate,
        data_format=data_format,
    )
    if xla_padding != "SAME":
        pads = ((0, 0),) * n if xla_padding == "VALID" else xla_padding
        check_output_size(
            input_shape,
            [x.shape[a] + lo + hi for a, (lo, hi) in zip(spatial_axes(n, data_format), pads)],
            [(k - 1) * d + 1 for k, d in zip(kernel.shape[:n], dilation_rate)],
            strides,
            f"kernel_size={kernel.shape[:n]}, strides={strides}, dilation_rate={dilation_rate}, "
            f"padding={padding!r}",
        )
    y = conv_impl.convolve(
        x,
        kernel,
        strides=strides,
        padding=xla_padding,
        dilation=dilation_rate,
        channels_last=data_format == "channels_last",
        groups=groups,
        precision=precision,
        dimension_numbers=_dimension_numbers(n, data_format),
    )
    return bias_activation(y, bias, activation, axis=_channel_axis(data_format))


def _rank_checked(rank: int, name: str) -> Callable[..., Array]:
    def fn(x: Array, kernel: Array, bias: Array | None = None, **kwargs: Any) -> Array:
        if kernel.ndim != rank + 2:
            raise ValueError(
                f"{name} expects a kernel with {rank + 2} dimensions "
                f"[*{rank} kernel_size, in_channels // groups, filters], got shape {kernel.shape}."
            )
        return conv(x, kernel, bias, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = inspect.signature(conv)
    fn.__doc__ = (
        f"{rank}-D convolution equal to Keras 3's ``Conv{rank}D`` forward pass: :func:`conv` with "
        "the kernel rank checked."
    )
    return fn


conv1d = _rank_checked(1, "conv1d")
conv2d = _rank_checked(2, "conv2d")
conv3d = _rank_checked(3, "conv3d")


def depthwise_conv(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "valid",
    data_format: str | None = None,
    dilation_rate: int | Sequence[int] = 1,
    activation: ActivationLike = None,
    padding_mode: str = "zeros",
    dtype: Any = None,
    precision: Any = None,
) -> Array:
    """Depthwise convolution (Keras ``DepthwiseConv{1,2}D``).

    ``kernel`` is ``[*kernel_size, C, depth_multiplier]``; the output has
    ``C * depth_multiplier`` channels. Implemented, as Keras does, as a grouped convolution
    with ``groups = C`` on the kernel reshaped to ``[*kernel_size, 1, C * depth_multiplier]``.
    """
    n = kernel.ndim - 2
    data_format = backend.standardize_data_format(data_format)
    channels = _kernel_channels(x, kernel, -2, data_format, "Depthwise")
    grouped = jnp.reshape(kernel, kernel.shape[:n] + (1, channels * kernel.shape[-1]))
    return conv(
        x,
        grouped,
        bias,
        strides=strides,
        padding=padding,
        data_format=data_format,
        dilation_rate=dilation_rate,
        groups=channels,
        activation=activation,
        padding_mode=padding_mode,
        dtype=dtype,
        precision=precision,
    )


def separable_conv(
    x: Array,
    depthwise_kernel: Array,
    pointwise_kernel: Array,
    bias: Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "valid",
    data_format: str | None = None,
    dilation_rate: int | Sequence[int] = 1,
    activation: ActivationLike = None,
    padding_mode: str = "zeros",
    dtype: Any = None,
    precision: Any = None,
) -> Array:
    """Depthwise then pointwise (1x1) convolution (Keras ``SeparableConv{1,2}D``).

    ``depthwise_kernel``: ``[*kernel_size, C, depth_multiplier]``;
    ``pointwise_kernel``: ``[*ones, C * depth_multiplier, filters]``.
    """
    y = depthwise_conv(
        x,
        depthwise_kernel,
        None,
        strides=strides,
        padding=padding,
        data_format=data_format,
        dilation_rate=dilation_rate,
        padding_mode=padding_mode,
        dtype=dtype,
        precision=precision,
    )
    return conv(
        y,
        pointwise_kernel,
        bias,
        data_format=data_format,
        activation=activation,
        dtype=dtype,
        precision=precision,
    )


def conv_transpose(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: str = "valid",
    output_padding: int | Sequence[int] | None = None,
    data_format: str | None = None,
    dilation_rate: int | Sequence[int] = 1,
    activation: ActivationLike = None,
    dtype: Any = None,
    precision: Any = None,
) -> Array:
    """Transposed convolution (Keras ``Conv{1,2,3}DTranspose``).

    ``kernel`` is Keras' transposed layout ``[*kernel_size, filters, C]``. Output sizes follow
    Keras: ``valid`` gives ``(L - 1) * s + max(k_eff, s)`` and ``same`` gives ``L * s`` when
    ``output_padding`` is ``None``.
    """
    n = kernel.ndim - 2
    data_format = backend.standardize_data_format(data_format)
    strides = normalize_tuple(strides, n, "strides")
    dilation_rate = normalize_tuple(dilation_rate, n, "dilation_rate")
    mode, output_padding = check_transpose_padding(padding, output_padding, strides)
    _kernel_channels(x, kernel, -1, data_format, "Transposed")
    pads = []
    for i in range(n):
        k = (kernel.shape[i] - 1) * dilation_rate[i] + 1
        s = strides[i]
        op = None if output_padding is None else output_padding[i]
        if mode == "valid":
            op = max(k, s) - k if op is None else op
            lo, hi = k - 1, k - 1 + op
        else:
            total = s + k - 2 if op is None else k + k % 2 - 2 + op
            lo = min(total // 2 + total % 2, k - 1)
            hi = total - lo
        pads.append((lo, hi))
    compute_dtype = kernel.dtype if dtype is None else jnp.dtype(dtype)
    # lax.conv_transpose's sums, with the strides' zeros inserted by an explicit pad instead of
    # lhs_dilation: XLA differentiates that form several times faster (experiments/bench).
    x = jnp.asarray(x, compute_dtype)
    widths = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi), s in zip(spatial_axes(n, data_format), pads, strides):
        widths[axis] = (lo, hi, s - 1)
    kernel = jnp.flip(jnp.asarray(kernel, compute_dtype), tuple(range(n))).swapaxes(n, n + 1)
    y = lax.conv_general_dilated(
        lax.pad(x, jnp.zeros((), compute_dtype), widths),
        kernel,
        window_strides=(1,) * n,
        padding="VALID",
        rhs_dilation=dilation_rate,
        dimension_numbers=_dimension_numbers(n, data_format),
        precision=precision,
    )
    return bias_activation(y, bias, activation, axis=_channel_axis(data_format))


def init_conv(
    key: Array,
    *,
    in_channels: int,
    filters: int,
    kernel_size: int | Sequence[int],
    rank: int = 2,
    groups: int = 1,
    use_bias: bool = True,
    kernel_initializer: Any = "glorot_uniform",
    bias_initializer: Any = "zeros",
    param_dtype: Any = jnp.float32,
) -> dict[str, Array]:
    """Creates ``{"kernel", "bias"}`` for :func:`conv` in Keras' layout.

    ``kernel`` has shape ``(*kernel_size, in_channels // groups, filters)`` and is drawn by the
    Keras initializer (name, config dict, instance or callable ``(key, shape, dtype)``) with
    Keras' fan computation; ``bias`` has shape ``(filters,)`` and is omitted when
    ``use_bias=False``.
    """
    filters = check_positive_int(filters, "filters")
    in_channels = check_positive_int(in_channels, "in_channels")
    groups = check_positive_int(groups, "groups")
    kernel_size = normalize_tuple(kernel_size, rank, "kernel_size")
    if in_channels % groups:
        raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}.")
    if filters % groups:
        raise ValueError(f"filters={filters} must be divisible by groups={groups}.")
    kernel_key, bias_key = jax.random.split(key)
    shape = (*kernel_size, in_channels // groups, filters)
    params = {"kernel": initializers_lib.get(kernel_initializer)(kernel_key, shape, param_dtype)}
    if use_bias:
        params["bias"] = initializers_lib.get(bias_initializer)(bias_key, (filters,), param_dtype)
    return params
