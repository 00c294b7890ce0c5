"""Evaluation metrics by name: each is a function of one batch returning sums, and a value
computed from the sums over a whole split.

A user adds one in their own module (imported by their config file) and lists it in
``config.metrics``::

    import jax, jax.numpy as jnp
    from cnnlab.train import metrics

    @metrics.register("top3_accuracy")
    def top3_accuracy(logits, labels, mask):
        hit = jnp.any(jax.lax.top_k(logits, 3)[1] == labels[:, None], axis=-1)
        return {"top3": jnp.sum(hit * mask)}

The value defaults to the metric's single sum divided by the number of images (``count``);
pass ``value=fn(totals) -> float`` for anything else (``totals`` holds every metric's sums plus
``count`` and the ``confusion`` matrix ``[true, predicted]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnlab._registry import Registry

Array = jax.Array
SumsFn = Callable[[Array, Array, Array], dict[str, Array]]


@dataclasses.dataclass(frozen=True)
class Metric:
    """``sums(logits [B, K] float32, labels [B] int, mask [B] float) -> {name: scalar}`` and
    ``value(totals) -> float`` over a whole split."""

    sums: SumsFn
    value: Callable[[Mapping[str, Any]], float]


METRICS = Registry("metric", {})


def register(name: str, *, value: Callable[[Mapping[str, Any]], float] | None = None):
    """Decorator registering ``fn(logits, labels, mask) -> sums`` as metric ``name``."""

    def decorator(fn: SumsFn) -> SumsFn:
        def mean_of_single_sum(totals: Mapping[str, Any], fn=fn) -> float:
            keys = sorted(_sum_shapes(fn))
            if len(keys) != 1:
                raise ValueError(
                    f"Metric {name!r} returns sums {sorted(keys)}; register it with value=... to "
                    "say how they combine."
                )
            return float(totals[keys[0]]) / max(float(totals["count"]), 1.0)

        METRICS.register(name, Metric(sums=fn, value=value or mean_of_single_sum), module=fn.__module__)
        return fn

    return decorator


def _sum_shapes(fn: SumsFn) -> dict[str, Any]:
    """The sums ``fn`` returns, found by tracing it on a tiny batch (no compute)."""
    spec = jax.ShapeDtypeStruct
    return jax.eval_shape(
        fn, spec((2, 6), jnp.float32), spec((2,), jnp.int32), spec((2,), jnp.float32)
    )


def metric_names() -> tuple[str, ...]:
    """Every registered metric name."""
    return METRICS.names()


def batch_sums(
    names: Sequence[str], logits: Array, labels: Array, mask: Array, num_classes: int
) -> dict[str, Array]:
    """One batch's sums for the metrics ``names`` plus ``count`` and ``confusion`` (traced)."""
    pred = jnp.argmax(logits, -1)
    out = {
        "count": jnp.sum(mask),
        "confusion": (jax.nn.one_hot(labels, num_classes) * mask[:, None]).T
        @ jax.nn.one_hot(pred, num_classes),
    }
    for name in names:
        sums = METRICS.lookup(name).sums(logits, labels, mask)
        clash = set(sums) & set(out)
        if clash:
            raise ValueError(f"Metric {name!r} returns sums {sorted(clash)} that another metric uses.")
        out.update(sums)
    return out


def split_values(names: Sequence[str], totals: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: value}`` for ``names`` from a split's summed (host) totals, plus ``count`` and
    ``confusion``."""
    out: dict[str, Any] = {name: METRICS.lookup(name).value(totals) for name in names}
    out["count"] = int(totals["count"])
    out["confusion"] = np.asarray(totals["confusion"])
    return out


# ---------------------------------------------------------------------------------------------
# Built-in metrics
# ---------------------------------------------------------------------------------------------


@register("loss")
def loss(logits: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Mean softmax cross-entropy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss": jnp.sum(ce * mask)}


@register("accuracy")
def accuracy(logits: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Top-1 accuracy."""
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask)}


@register("top5_accuracy")
def top5_accuracy(logits: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Whether the label is among the 5 largest logits (all of them with fewer classes)."""
    k = min(5, logits.shape[-1])
    hit = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    return {"top5": jnp.sum(hit * mask)}


def _mean_per_class(totals: Mapping[str, Any]) -> float:
    confusion = np.asarray(totals["confusion"], np.float64)
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros_like(support), where=support > 0)
    return float(per_class[support > 0].mean()) if (support > 0).any() else 0.0


@register("mean_per_class_accuracy", value=_mean_per_class)
def mean_per_class_accuracy(logits: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Accuracy averaged over the classes present (from the confusion matrix)."""
    return {}


DEFAULT_METRICS = ("loss", "accuracy", "top5_accuracy", "mean_per_class_accuracy")
