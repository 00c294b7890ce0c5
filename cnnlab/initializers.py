"""Keras 3 weight initializers in pure JAX, with Keras' names, arguments and distributions.

Every initializer is an object called as ``init(key, shape, dtype=jnp.float32) -> Array`` (the
signature Flax's ``self.param`` uses): ``key`` is a JAX PRNG key and is the *only* source of
randomness. The ``seed`` constructor argument exists so that Keras configs load unchanged; it is
stored and returned by ``get_config()`` but never used to draw numbers. To reproduce what Keras
(JAX backend) draws for ``seed=s``, pass ``keras_key(s)`` as the key: the values then match
``keras.initializers.<Name>(seed=s)(shape)`` exactly.

Fans follow Keras' :func:`compute_fans`: for a conv kernel ``(*spatial, in, out)`` the
receptive field is ``prod(spatial)``, ``fan_in = in * rf`` and ``fan_out = out * rf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnlab._keras_object import KerasObject, classes_in
from cnnlab._registry import Registry, serialize_object

Array = jax.Array
Shape = Sequence[int]
DTypeLike = Any
InitFn = Callable[..., Array]

# Keras' correction so a normal truncated at +-2 stddev has the requested standard deviation:
# the std of a standard normal truncated to [-2, 2].
_TRUNCATED_STDDEV_CORRECTION = 0.87962566103423978


def keras_key(seed: int) -> Array:
    """The PRNG key Keras' JAX backend derives from an integer ``seed`` (``uint32[seed, 0]``).

    ``init(keras_key(s), shape)`` reproduces ``keras.initializers.<Name>(seed=s)(shape)``.
    """
    return jnp.asarray([int(seed) & 0xFFFFFFFF, 0], dtype=jnp.uint32)


def _dtype(dtype: DTypeLike) -> np.dtype:
    return jnp.dtype(jnp.float32 if dtype is None else dtype)


def _shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (int(shape),)
    return tuple(int(d) for d in shape)


def compute_fans(
    shape: Shape,
    input_axes: Sequence[int] | None = None,
    output_axes: Sequence[int] | None = None,
) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight ``shape``, exactly as Keras computes them.

    * ``input_axes`` and ``output_axes`` both given: products of those dimensions.
    * rank 0: ``(1, 1)``; rank 1 ``(n,)``: ``(n, n)``; rank 2 ``(in, out)``: ``(in, out)``.
    * rank >= 3 (conv kernel ``(*spatial, in, out)``): ``rf = prod(spatial)``,
      ``(in * rf, out * rf)``.
    """
    shape = _shape(shape)
    if input_axes is not None and output_axes is not None:
        fan_in = math.prod(shape[a] for a in input_axes)
        fan_out = math.prod(shape[a] for a in output_axes)
        return int(fan_in), int(fan_out)
    if len(shape) < 1:
        fan_in = fan_out = 1
    elif len(shape) == 1:
        fan_in = fan_out = shape[0]
    elif len(shape) == 2:
        fan_in, fan_out = shape
    else:
        receptive_field_size = math.prod(shape[:-2])
        fan_in = shape[-2] * receptive_field_size
        fan_out = shape[-1] * receptive_field_size
    return int(fan_in), int(fan_out)


class Initializer(KerasObject):
    """Base class: ``init(key, shape, dtype=jnp.float32) -> Array`` of that shape and dtype."""

    def __call__(self, key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        raise NotImplementedError("Initializer subclasses must implement __call__.")

    def clone(self) -> Initializer:
        return self.__class__.from_config(self.get_config())


# --- constant initializers ---------------------------------------------------------------------


def _plain_value(value: Any) -> Any:
    """A JSON-friendly form of a constant (arrays -> nested lists)."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    return value


class Constant(Initializer):
    """Fills with ``value`` (a scalar, or an array broadcastable to ``shape``). ``key`` is
    ignored."""

    def __init__(self, value: Any = 0.0) -> None:
        self.value = value

    def __call__(self, key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        dtype = _dtype(dtype)
        return jnp.asarray(self.value, dtype=dtype) * jnp.ones(_shape(shape), dtype=dtype)

    def get_config(self) -> dict[str, Any]:
        return {"value": _plain_value(self.value)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Constant:
        value = config["value"]
        # Keras serializes array values as {"class_name": "__numpy__", "config": {"value": ...}}.
        if isinstance(value, dict) and isinstance(value.get("config"), dict):
            value = value["config"].get("value", value)
        return cls(value)


class Zeros(Initializer):
    """Fills with 0. ``key`` is ignored."""

    def __call__(self, key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        return jnp.zeros(_shape(shape), dtype=_dtype(dtype))


class Ones(Initializer):
    """Fills with 1. ``key`` is ignored."""

    def __call__(self, key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        return jnp.ones(_shape(shape), dtype=_dtype(dtype))


class Identity(Initializer):
    """``gain * eye(rows, cols)`` for a rank-2 ``shape`` (rectangular allowed). ``key`` is
    ignored."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = gain

    def __call__(self, key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        shape = _shape(shape)
        if len(shape) != 2:
            raise ValueError(
                "Identity matrix initializer can only be used for 2D matrices. "
                f"Received: shape={shape} of rank {len(shape)}."
            )
        return self.gain * jnp.eye(*shape, dtype=_dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"gain": self.gain}


def _general_cosine(length: int, coefficients: Sequence[float]) -> np.ndarray:
    fac = np.linspace(-np.pi, np.pi, length)
    window = np.zeros(length)
    for k, a in enumerate(coefficients):
        window += a * np.cos(k * fac)
    return window


def _bartlett(length: int) -> np.ndarray:
    n = np.arange(0, length)
    return np.where(n <= (length - 1) / 2.0, 2.0 * n / (length - 1), 2.0 - 2.0 * n / (length - 1))


_WINDOWS: dict[str, Callable[[int], np.ndarray]] = {
    "hann": lambda m: _general_cosine(m, (0.5, 0.5)),
    "hamming": lambda m: _general_cosine(m, (0.54, 0.46)),
    "blackman": lambda m: _general_cosine(m, (0.42, 0.50, 0.08)),
    "bartlett": _bartlett,
    "boxcar": np.ones,
}
_WINDOW_ALIASES = {
    "hanning": "hann",
    "han": "hann",
    "hamm": "hamming",
    "ham": "hamming",
    "black": "blackman",
    "blk": "blackman",
    "bart": "bartlett",
    "brt": "bartlett",
    "box": "boxcar",
    "ones": "boxcar",
    "rect": "boxcar",
    "rectangular": "boxcar",
}


def _window_name(window: str) -> str:
    name = _WINDOW_ALIASES.get(window, window)
    if name not in _WINDOWS:
        raise ValueError(
            f"Unsupported STFT window {window!r}. Supported windows: "
            f"{', '.join(sorted([*_WINDOWS, *_WINDOW_ALIASES]))} (or an array, or None)."
        )
    return name


def _get_window(window: str, length: int, periodic: bool) -> np.ndarray:
    """``scipy.signal.get_window(window, length, fftbins=periodic)`` for the supported names."""
    fn = _WINDOWS[_window_name(window)]
    if length == 1:
        return np.ones(1)
    if periodic:
        return fn(length + 1)[:-1]
    return fn(length)


class STFT(Initializer):
    """Conv kernel ``(frame_length, input_channels, fft_length)`` computing the real or
    imaginary part of a short-time Fourier transform (``fft_length`` frequency bins), optionally
    windowed and scaled. ``key`` is ignored.

    Args:
        side: ``"real"`` (cosine kernel) or ``"imag"`` (sine kernel).
        window: a window name (``"hann"``, ``"hamming"``, ``"blackman"``, ``"bartlett"``,
            ``"boxcar"``; Keras accepts any SciPy window, cnnlab these), a 1-D array of length
            ``frame_length``, or ``None``.
        scaling: ``"density"`` (divide by the window's L2 norm), ``"spectrum"`` (by its L1 norm)
            or ``None``.
        periodic: use the periodic (DFT-even) window instead of the symmetric one.
    """

    def __init__(
        self,
        side: str = "real",
        window: str | Sequence[float] | None = "hann",
        scaling: str | None = "density",
        periodic: bool = False,
    ) -> None:
        if side not in ("real", "imag"):
            raise ValueError(f"side should be 'real' or 'imag', not {side!r}")
        if isinstance(window, str):
            _window_name(window)
        if scaling is not None and scaling not in ("density", "spectrum"):
            raise ValueError(
                "Scaling is invalid, it must be `None`, 'density' or 'spectrum'. "
                f"Received scaling={scaling!r}"
            )
        self.side = side
        self.window = window
        self.scaling = scaling
        self.periodic = periodic

    def __call__(self, key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        dtype = _dtype(dtype)
        shape = _shape(shape)
        if len(shape) != 3:
            raise ValueError(
                "STFT initializer expects a shape (frame_length, input_channels, fft_length). "
                f"Received: shape={shape}."
            )
        frame_length, _, fft_length = shape
        win = None
        scaling = 1
        if self.window is not None:
            win = self.window
            if isinstance(win, str):
                win = _get_window(win, frame_length, self.periodic)
            win = jnp.asarray(win, dtype=dtype)
            if win.ndim != 1 or win.shape[-1] != frame_length:
                raise ValueError(
                    "The shape of `window` must be equal to [frame_length]. "
                    f"Received: window shape={win.shape}"
                )
            win = win.reshape(frame_length, 1, 1)
            if self.scaling == "density":
                scaling = jnp.sqrt(jnp.sum(jnp.square(win)))
            elif self.scaling == "spectrum":
                scaling = jnp.sum(jnp.abs(win))
        freq = jnp.arange(fft_length, dtype=dtype).reshape(1, 1, fft_length) / (
            (fft_length - 1) * 2
        )
        time = jnp.arange(frame_length, dtype=dtype).reshape(frame_length, 1, 1)
        args = ((-2 * time) * freq) * jnp.arccos(jnp.asarray(-1, dtype))
        kernel = (jnp.cos(args) if self.side == "real" else jnp.sin(args)).astype(dtype)
        if win is not None:
            kernel = (kernel * win) / scaling
        # Keras returns (frame_length, 1, fft_length) whatever input_channels is; broadcast so
        # the result always has the requested shape (identical when input_channels == 1).
        return jnp.broadcast_to(kernel, shape).astype(dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "window": _plain_value(self.window),
            "periodic": self.periodic,
            "scaling": self.scaling,
        }


# --- random initializers -----------------------------------------------------------------------


def _check_key(key: Any, init: Initializer) -> Array:
    if key is None:
        raise ValueError(
            f"{type(init).__name__} is random: call it as init(key, shape, dtype) with a JAX PRNG "
            "key (e.g. jax.random.key(0), or keras_key(seed) to reproduce Keras' draws)."
        )
    return key


class RandomInitializer(Initializer):
    """Base of the random initializers. ``seed`` is kept only for config compatibility with
    Keras; the ``key`` passed to ``__call__`` determines the values."""

    def __init__(self, seed: Any = None) -> None:
        self.seed = seed

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


class RandomNormal(RandomInitializer):
    """Normal samples ``N(mean, stddev**2)``."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: Any = None) -> None:
        self.mean = mean
        self.stddev = stddev
        super().__init__(seed=seed)

    def __call__(self, key: Array, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        key = _check_key(key, self)
        sample = jax.random.normal(key, shape=_shape(shape), dtype=_dtype(dtype))
        return sample * self.stddev + self.mean

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(RandomInitializer):
    """Normal samples ``mean + stddev * z`` with ``z`` truncated to ``[-2, 2]`` (values beyond
    two standard deviations are re-drawn), so the actual std is ``~0.88 * stddev``."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: Any = None) -> None:
        self.mean = mean
        self.stddev = stddev
        super().__init__(seed=seed)

    def __call__(self, key: Array, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        key = _check_key(key, self)
        sample = jax.random.truncated_normal(
            key, shape=_shape(shape), lower=-2.0, upper=2.0, dtype=_dtype(dtype)
        )
        return sample * self.stddev + self.mean

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class RandomUniform(RandomInitializer):
    """Uniform samples in ``[minval, maxval)``."""

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: Any = None) -> None:
        self.minval = minval
        self.maxval = maxval
        super().__init__(seed=seed)

    def __call__(self, key: Array, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        key = _check_key(key, self)
        return jax.random.uniform(
            key, shape=_shape(shape), dtype=_dtype(dtype), minval=self.minval, maxval=self.maxval
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


class VarianceScaling(RandomInitializer):
    """Samples with variance ``scale / n``, ``n`` = fan_in, fan_out or their mean (``mode``).

    ``distribution``: ``"truncated_normal"`` (``"normal"`` is an alias; stddev
    ``sqrt(scale / n) / 0.8796...`` truncated at 2 stddev so the result has std
    ``sqrt(scale / n)``), ``"untruncated_normal"``, or ``"uniform"`` (in ``[-limit, limit]``,
    ``limit = sqrt(3 * scale / n)``). ``input_axes``/``output_axes`` override the fan axes.
    """

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: Any = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        if scale <= 0.0:
            raise ValueError(f"Argument `scale` must be positive float. Received: scale={scale}")
        allowed_modes = ("fan_in", "fan_out", "fan_avg")
        if mode not in allowed_modes:
            raise ValueError(
                f"Invalid `mode` argument: {mode!r}. Please use one of {allowed_modes}"
            )
        distribution = distribution.lower()
        if distribution == "normal":
            distribution = "truncated_normal"
        allowed_distributions = ("uniform", "truncated_normal", "untruncated_normal")
        if distribution not in allowed_distributions:
            raise ValueError(
                f"Invalid `distribution` argument: {distribution!r}. "
                f"Please use one of {allowed_distributions}"
            )
        self.scale = scale
        self.mode = mode
        self.distribution = distribution
        self.input_axes = input_axes
        self.output_axes = output_axes
        super().__init__(seed=seed)

    def __call__(self, key: Array, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        key = _check_key(key, self)
        shape, dtype = _shape(shape), _dtype(dtype)
        scale = self.scale
        fan_in, fan_out = compute_fans(
            shape, input_axes=self.input_axes, output_axes=self.output_axes
        )
        if self.mode == "fan_in":
            scale /= max(1.0, fan_in)
        elif self.mode == "fan_out":
            scale /= max(1.0, fan_out)
        else:
            scale /= max(1.0, (fan_in + fan_out) / 2.0)
        if self.distribution == "truncated_normal":
            stddev = math.sqrt(scale) / _TRUNCATED_STDDEV_CORRECTION
            sample = jax.random.truncated_normal(
                key, shape=shape, lower=-2.0, upper=2.0, dtype=dtype
            )
            return sample * stddev + 0.0
        if self.distribution == "untruncated_normal":
            stddev = math.sqrt(scale)
            return jax.random.normal(key, shape=shape, dtype=dtype) * stddev + 0.0
        limit = math.sqrt(3.0 * scale)
        return jax.random.uniform(key, shape=shape, dtype=dtype, minval=-limit, maxval=limit)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
            "input_axes": self.input_axes,
            "output_axes": self.output_axes,
        }


class _FixedVarianceScaling(VarianceScaling):
    """A VarianceScaling preset (class keywords ``scale``, ``mode``, ``distribution``): only
    ``seed`` and the fan axes are configurable."""

    def __init_subclass__(cls, *, scale: float, mode: str, distribution: str) -> None:
        super().__init_subclass__()
        cls._PRESET = {"scale": scale, "mode": mode, "distribution": distribution}

    def __init__(
        self,
        seed: Any = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(**self._PRESET, seed=seed, input_axes=input_axes, output_axes=output_axes)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed, "input_axes": self.input_axes, "output_axes": self.output_axes}


class GlorotUniform(_FixedVarianceScaling, scale=1.0, mode="fan_avg", distribution="uniform"):
    """Xavier uniform: ``U(-limit, limit)``, ``limit = sqrt(6 / (fan_in + fan_out))``."""


class GlorotNormal(_FixedVarianceScaling, scale=1.0, mode="fan_avg", distribution="truncated_normal"):
    """Xavier normal: truncated normal with std ``sqrt(2 / (fan_in + fan_out))``."""


class LecunNormal(_FixedVarianceScaling, scale=1.0, mode="fan_in", distribution="truncated_normal"):
    """LeCun normal: truncated normal with std ``sqrt(1 / fan_in)``."""


class LecunUniform(_FixedVarianceScaling, scale=1.0, mode="fan_in", distribution="uniform"):
    """LeCun uniform: ``U(-limit, limit)``, ``limit = sqrt(3 / fan_in)``."""


class HeNormal(_FixedVarianceScaling, scale=2.0, mode="fan_in", distribution="truncated_normal"):
    """He normal: truncated normal with std ``sqrt(2 / fan_in)``."""


class HeUniform(_FixedVarianceScaling, scale=2.0, mode="fan_in", distribution="uniform"):
    """He uniform: ``U(-limit, limit)``, ``limit = sqrt(6 / fan_in)``."""


class Orthogonal(RandomInitializer):
    """``gain`` times a random orthogonal matrix (QR of a Gaussian matrix, sign-corrected).

    A shape ``(*lead, n)`` is treated as a ``(prod(lead), n)`` matrix and reshaped back; it has
    orthonormal columns if ``prod(lead) >= n``, else orthonormal rows.
    """

    def __init__(self, gain: float = 1.0, seed: Any = None) -> None:
        self.gain = gain
        super().__init__(seed=seed)

    def __call__(self, key: Array, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        key = _check_key(key, self)
        shape, dtype = _shape(shape), _dtype(dtype)
        if len(shape) < 2:
            raise ValueError(
                "The tensor to initialize must be at least two-dimensional. "
                f"Received: shape={shape} of rank {len(shape)}."
            )
        num_rows = math.prod(shape[:-1])
        num_cols = shape[-1]
        flat_shape = (max(num_cols, num_rows), min(num_cols, num_rows))
        a = jax.random.normal(key, shape=flat_shape, dtype=dtype)
        # LAPACK has no half-precision QR (Keras fails there): factorize in float32.
        qr_dtype = jnp.promote_types(dtype, jnp.float32)
        q, r = jnp.linalg.qr(a.astype(qr_dtype), mode="reduced")
        q = q * jnp.sign(jnp.diag(r))
        if num_rows < num_cols:
            q = q.T
        return (self.gain * q.reshape(shape)).astype(dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "gain": self.gain}


# Keras' lowercase aliases (``keras.initializers.he_normal`` is the class ``HeNormal``).
constant = Constant
zeros = Zeros
ones = Ones
identity = Identity
stft = STFT
random_normal = RandomNormal
truncated_normal = TruncatedNormal
random_uniform = RandomUniform
variance_scaling = VarianceScaling
glorot_uniform = GlorotUniform
glorot_normal = GlorotNormal
lecun_normal = LecunNormal
lecun_uniform = LecunUniform
he_normal = HeNormal
he_uniform = HeUniform
orthogonal = Orthogonal

_REGISTRY = Registry(
    "initializer",
    {
        **classes_in(globals(), Initializer, exclude=(RandomInitializer,)),
        # Keras' extra aliases.
        "IdentityInitializer": Identity,
        "OrthogonalInitializer": Orthogonal,
        "STFTInitializer": STFT,
        "normal": RandomNormal,
        "uniform": RandomUniform,
        "one": Ones,
        "zero": Zeros,
    },
)


def names() -> tuple[str, ...]:
    """Every name :func:`get` accepts (CamelCase class names, snake_case names, aliases)."""
    return _REGISTRY.names()


def _from_array(value: Any) -> InitFn:
    array = jnp.asarray(value)

    def initialize_fn(key: Array | None, shape: Shape, dtype: DTypeLike = jnp.float32) -> Array:
        if _shape(shape) != tuple(array.shape):
            raise ValueError(
                f"Expected `shape` to be {tuple(array.shape)} for direct tensor as initializer. "
                f"Received shape={tuple(shape)}"
            )
        return array.astype(_dtype(dtype))

    return initialize_fn


def get(identifier: Any) -> InitFn | None:
    """Resolves an initializer identifier as ``keras.initializers.get`` does.

    ``None`` -> ``None``; a name (``"he_normal"``, ``"HeNormal"``, ``"zeros"``...) or a class ->
    a default instance; ``{"class_name": "VarianceScaling", "config": {...}}`` -> instance via
    ``from_config``; an array -> an initializer returning it (shape checked); an instance or a
    plain callable ``(key, shape, dtype) -> Array`` -> returned unchanged. Unknown names raise
    ``ValueError`` listing the valid ones.
    """
    if isinstance(identifier, (np.ndarray, np.generic, jax.Array)):
        return _from_array(identifier)
    return _REGISTRY.get(identifier)


def serialize(initializer: Initializer) -> dict[str, Any]:
    """``{"class_name": ..., "config": ...}`` for a built-in initializer (inverse of :func:`get`)."""
    return serialize_object(initializer, _REGISTRY)
