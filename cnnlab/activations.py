"""Keras 3 activation functions in pure JAX, with Keras' names, defaults and numerics.

Every function maps an array ``x`` of any shape to an array of the same shape (``glu`` halves
the size of ``axis``), elementwise unless it takes an ``axis``. Each one reproduces what
``keras.activations.<name>`` computes on the JAX backend (same formula, same operation order,
same gradient conventions: ``relu'(0) = 0``, ``relu6'(0) = relu6'(6) = 0``), so models built
with cnnlab match Keras numerically. Options are keyword-only. Integer inputs are promoted to
float32 (Keras' ``floatx``).

:func:`get` resolves a layer's ``activation`` argument as Keras does: ``None`` -> :func:`linear`,
a name (``"relu"``, ``"swish"``...), a serialized config, or any callable.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnlab._registry import Registry

Array = jax.Array
ArrayLike = Any
Activation = Callable[..., Array]

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _float(x: ArrayLike) -> Array:
    """``x`` as a JAX array with an inexact dtype (integers and bools -> float32)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.float32)
    return x


# --- relu family -------------------------------------------------------------------------------


@jax.custom_jvp
def _relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


# Same convention as Keras (jax.nn.relu): the derivative at 0 is 0.
_relu.defjvps(lambda g, ans, x: lax.select(x > 0, g, lax.full_like(g, 0)))


@jax.custom_jvp
def _relu6(x: Array) -> Array:
    return jnp.minimum(jnp.maximum(x, 0), 6.0)


_relu6.defjvps(lambda g, ans, x: lax.select((x > 0) & (x < 6), g, lax.full_like(g, 0)))


def relu(
    x: ArrayLike,
    *,
    negative_slope: float = 0.0,
    max_value: float | None = None,
    threshold: float = 0.0,
) -> Array:
    """Rectified linear unit: ``max(x, 0)`` by default.

    With options: values ``<= threshold`` become ``negative_slope * (x - threshold)``, and the
    result is clipped at ``max_value``; the branch structure follows Keras' ``ReLU.static_call``
    exactly (e.g. ``negative_slope != 0`` alone is a leaky ReLU).
    """
    x = _float(x)
    if negative_slope != 0.0:
        if max_value is None and threshold == 0:
            return leaky_relu(x, negative_slope=negative_slope)
        negative_part = _relu(-x + threshold) if threshold != 0 else _relu(-x)
    else:
        negative_part = 1

    clip_max = max_value is not None
    if threshold != 0:
        x = jnp.where(x > jnp.asarray(threshold, x.dtype), x, 0)
    elif max_value == 6:
        x = _relu6(x)
        clip_max = False
    else:
        x = _relu(x)

    if clip_max:
        x = jnp.clip(x, jnp.asarray(0.0, x.dtype), jnp.asarray(max_value, x.dtype))
    if negative_slope != 0.0:
        x = x - negative_slope * negative_part
    return x


def leaky_relu(x: ArrayLike, *, negative_slope: float = 0.2) -> Array:
    """``x`` for ``x >= 0``, ``negative_slope * x`` otherwise (Keras default slope 0.2)."""
    x = _float(x)
    return jnp.where(x >= 0, x, negative_slope * x)


def relu6(x: ArrayLike) -> Array:
    """``min(max(x, 0), 6)``."""
    return _relu6(_float(x))


def elu(x: ArrayLike, *, alpha: float = 1.0) -> Array:
    """Exponential linear unit: ``x`` for ``x > 0``, ``alpha * (exp(x) - 1)`` otherwise."""
    x = _float(x)
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.where(x > 0, 0.0, x)))


def selu(x: ArrayLike) -> Array:
    """Scaled ELU: ``scale * elu(x, alpha)`` with Klambauer et al.'s fixed constants."""
    return _SELU_SCALE * elu(x, alpha=_SELU_ALPHA)


def celu(x: ArrayLike, *, alpha: float = 1.0) -> Array:
    """Continuously differentiable ELU: ``max(x, 0) + alpha * expm1(min(x, 0) / alpha)``."""
    x = _float(x)
    return jnp.maximum(x, 0.0) + alpha * jnp.expm1(jnp.minimum(x, 0.0) / alpha)


# --- smooth / sigmoid family -------------------------------------------------------------------


def sigmoid(x: ArrayLike) -> Array:
    """Logistic sigmoid ``1 / (1 + exp(-x))``."""
    return lax.logistic(_float(x))


def hard_sigmoid(x: ArrayLike) -> Array:
    """Piecewise-linear sigmoid: ``relu6(x + 3) / 6``."""
    return _relu6(_float(x) + 3.0) / 6.0


def sparse_sigmoid(x: ArrayLike) -> Array:
    """``0.5 * clip(x + 1, 0, 2)``: 0 below -1, 1 above 1, linear in between."""
    return 0.5 * jnp.clip(_float(x) + 1.0, 0.0, 2.0)


def log_sigmoid(x: ArrayLike) -> Array:
    """``log(sigmoid(x)) = -softplus(-x)``, computed stably."""
    return -softplus(-_float(x))


def softplus(x: ArrayLike) -> Array:
    """``log(exp(x) + 1)``, computed stably as ``logaddexp(x, 0)``."""
    return jnp.logaddexp(_float(x), 0)


def softsign(x: ArrayLike) -> Array:
    """``x / (|x| + 1)``."""
    x = _float(x)
    return x / (jnp.abs(x) + 1)


def squareplus(x: ArrayLike, *, b: float = 4) -> Array:
    """``(x + sqrt(x**2 + b)) / 2``: a smooth ReLU with smoothness ``b``."""
    x = _float(x)
    return (x + jnp.sqrt(jnp.square(x) + b)) / 2


def sparse_plus(x: ArrayLike) -> Array:
    """0 for ``x <= -1``, ``(x + 1)**2 / 4`` for ``-1 < x < 1``, ``x`` for ``x >= 1``."""
    x = _float(x)
    return jnp.where(x <= -1.0, 0.0, jnp.where(x >= 1.0, x, (x + 1.0) ** 2 / 4))


def silu(x: ArrayLike) -> Array:
    """SiLU / swish: ``x * sigmoid(x)``."""
    x = _float(x)
    return x * lax.logistic(x)


def hard_silu(x: ArrayLike) -> Array:
    """Hard SiLU / hard swish: ``x * hard_sigmoid(x)``."""
    x = _float(x)
    return x * hard_sigmoid(x)


def gelu(x: ArrayLike, *, approximate: bool = False) -> Array:
    """Gaussian error linear unit ``x * Phi(x)``.

    Exact (erf) form by default, as ``keras.activations.gelu``; ``approximate=True`` uses the
    tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3)))``.
    """
    x = _float(x)
    if approximate:
        sqrt_2_over_pi = np.sqrt(2 / np.pi).astype(x.dtype)
        cdf = 0.5 * (1.0 + jnp.tanh(sqrt_2_over_pi * (x + 0.044715 * (x**3))))
        return x * cdf
    sqrt_half = np.sqrt(0.5).astype(x.dtype)
    return jnp.asarray(0.5 * x * lax.erfc(-x * sqrt_half), dtype=x.dtype)


def mish(x: ArrayLike) -> Array:
    """``x * tanh(softplus(x))``."""
    x = _float(x)
    return x * jnp.tanh(softplus(x))


def tanh(x: ArrayLike) -> Array:
    """Hyperbolic tangent."""
    return jnp.tanh(_float(x))


def tanh_shrink(x: ArrayLike) -> Array:
    """``x - tanh(x)``."""
    x = _float(x)
    return x - jnp.tanh(x)


def hard_tanh(x: ArrayLike) -> Array:
    """``clip(x, -1, 1)``."""
    x = _float(x)
    return jnp.where(x > 1, 1, jnp.where(x < -1, -1, x))


def hard_shrink(x: ArrayLike, *, threshold: float = 0.5) -> Array:
    """``x`` where ``|x| > threshold``, else 0."""
    x = _float(x)
    return jnp.where(jnp.abs(x) > threshold, x, 0.0)


def soft_shrink(x: ArrayLike, *, threshold: float = 0.5) -> Array:
    """``x - threshold`` above ``threshold``, ``x + threshold`` below ``-threshold``, else 0."""
    x = _float(x)
    return jnp.where(x > threshold, x - threshold, jnp.where(x < -threshold, x + threshold, 0.0))


def threshold(x: ArrayLike, threshold: float, default_value: float) -> Array:
    """``x`` where ``x > threshold``, else ``default_value`` (both required, as in Keras)."""
    x = _float(x)
    return jnp.where(x > threshold, x, default_value)


def exponential(x: ArrayLike) -> Array:
    """``exp(x)``."""
    return jnp.exp(_float(x))


def linear(x: ArrayLike) -> ArrayLike:
    """Identity: returns ``x`` unchanged (not even converted), as Keras does."""
    return x


# --- normalizing activations (take an axis) ----------------------------------------------------


def softmax(x: ArrayLike, *, axis: int | tuple[int, ...] = -1) -> Array:
    """``exp(x) / sum(exp(x))`` along ``axis`` (an int or a tuple of ints), max-shifted."""
    x = _float(x)
    x_max = jnp.max(x, axis=axis, keepdims=True)
    unnormalized = jnp.exp(x - lax.stop_gradient(x_max))
    return unnormalized / jnp.sum(unnormalized, axis=axis, keepdims=True)


def log_softmax(x: ArrayLike, *, axis: int | tuple[int, ...] = -1) -> Array:
    """``x - logsumexp(x)`` along ``axis``, max-shifted for stability."""
    x = _float(x)
    x_max = jnp.max(x, axis=axis, keepdims=True)
    shifted = x - lax.stop_gradient(x_max)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def sparsemax(x: ArrayLike, *, axis: int = -1) -> Array:
    """Euclidean projection of ``x`` onto the probability simplex along ``axis``
    (Martins & Astudillo, 2016): ``max(x - tau, 0)`` with ``tau`` chosen so the output sums to 1.
    """
    logits = _float(x)
    logits_sorted = -1.0 * jnp.sort(logits * -1.0, axis=axis)
    logits_cumsum = jnp.cumsum(logits_sorted, axis=axis)
    r_shape = [1] * logits.ndim
    r_shape[axis] = -1
    r = jnp.arange(1, logits.shape[axis] + 1).reshape(r_shape)
    support = logits_sorted - (logits_cumsum - 1) / r > 0
    k = jnp.sum(support, axis=axis, keepdims=True)
    logits_cumsum_safe = jnp.where(support, logits_cumsum, 0.0)
    tau = (jnp.sum(logits_cumsum_safe, axis=axis, keepdims=True) - 1) / k
    return jnp.maximum(logits - tau, 0.0)


def glu(x: ArrayLike, *, axis: int = -1) -> Array:
    """Gated linear unit: split ``x`` in halves ``a, b`` along ``axis``; return
    ``a * sigmoid(b)`` (``axis`` size must be even; the output has half of it)."""
    x = _float(x)
    size = x.shape[axis]
    if size % 2:
        raise ValueError(f"glu needs an even size along axis={axis}; got shape {tuple(x.shape)}.")
    a, b = jnp.split(x, 2, axis=axis)
    return a * lax.logistic(b)


# --- registry ----------------------------------------------------------------------------------

# Keras' aliases.
swish = silu
hard_swish = hard_silu

# Every public function above, under its Keras name and its aliases.
_REGISTRY = Registry(
    "activation",
    {n: f for n, f in globals().items() if inspect.isfunction(f) and f.__module__ == __name__ and n[0] != "_"},
)


def names() -> tuple[str, ...]:
    """Every name :func:`get` accepts (Keras' names and aliases), sorted."""
    return _REGISTRY.names()


def get(identifier: Any) -> Activation:
    """Resolves an activation identifier as ``keras.activations.get`` does.

    ``None`` -> :func:`linear`; a name (``"relu"``, ``"swish"``...); a config dict, either
    Keras 3's ``{"class_name": "function", "config": "relu"}`` or ``{"class_name": "relu",
    "config": {"max_value": 6.0}}`` (options bound with ``functools.partial``); or a callable,
    returned unchanged. Unknown names raise ``ValueError`` listing the valid ones.
    """
    return _REGISTRY.get(identifier, default=linear)


def serialize(activation: Activation) -> str | dict[str, Any]:
    """The Keras serialization of a built-in activation: its name (``"relu"``; aliases map to
    the canonical name, e.g. ``swish`` -> ``"silu"``), or ``{"class_name": name, "config":
    options}`` for a ``functools.partial`` of a built-in with keyword options.

    Raises:
        ValueError: ``activation`` is not a built-in (or a keyword partial of one).
    """
    fn, options = activation, {}
    if isinstance(activation, functools.partial) and not activation.args:
        fn, options = activation.func, dict(activation.keywords)
    name = _REGISTRY.name_of(fn, preferred=(getattr(fn, "__name__", ""),))
    if name is None:
        raise ValueError(
            f"Cannot serialize activation {activation!r}: not a built-in activation. "
            f"Valid names are: {', '.join(names())}."
        )
    return {"class_name": name, "config": options} if options else name
