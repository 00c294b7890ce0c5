"""Training losses by name (a registry), each owning its config fields, as augmentation ops do.

A loss is ``fn(logits, targets, **fields) -> [B]``: float32 logits ``[B, K]`` and soft targets
``[B, K]`` (one-hot, mixed by mixup/cutmix, smoothed by ``loss.label_smoothing``) to one value
per example; the step averages it and adds the layers' penalties. Its fields are set as
``loss.<name>.<field>``; a field declared ``traceable`` may differ between packed sweep trials.
A user adds one in their own module (imported by their config file)::

    from cnnlab.schema import Field, in_range
    from cnnlab.train import losses

    @losses.register("poly1", epsilon=Field(1.0, float, in_range(-1, 10), "weight of the first
                     polynomial term", traceable=True))
    def poly1(logits, targets, *, epsilon):
        ce = optax.softmax_cross_entropy(logits, targets)
        pt = jnp.sum(targets * jax.nn.softmax(logits), -1)
        return ce + epsilon * (1 - pt)

and a config sets ``config.loss.name = "poly1"`` and ``config.loss.poly1.epsilon = 2.0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cnnlab._registry import Registry
from cnnlab.schema import Field, Schema, at_least, chosen_part_section, in_range, part_values

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Loss:
    """``fn(logits, targets, **fields) -> [B]`` and its config fields."""

    fn: LossFn
    fields: dict[str, Field]

    def traceable(self) -> tuple[str, ...]:
        return tuple(name for name, f in self.fields.items() if f.traceable)


LOSSES = Registry("loss", {})
DEFAULT = "softmax_cross_entropy"


def register(name: str, **fields: Field) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn(logits, targets, **fields) -> [B]`` as ``loss.name = name``,
    with its parameters ``fields`` (settable as ``loss.<name>.<field>``)."""
    if name in ("name", "label_smoothing"):
        raise ValueError(f"{name!r} is a field of the loss section, not a loss name")

    def decorator(fn: LossFn) -> LossFn:
        LOSSES.register(name, Loss(fn, dict(fields)), module=fn.__module__)
        return fn

    return decorator


def loss_schema() -> Schema:
    """``loss``: the loss by name, label smoothing, and every registered loss's fields (read at
    call time, so a user's losses are included); resolved, only the chosen loss's section is
    kept."""
    return chosen_part_section("loss", {
        "name": Field(DEFAULT, str, choices=lambda: LOSSES, doc="registered training loss"),
        "label_smoothing": Field(0.0, float, in_range(0, 1), "label smoothing of the targets"),
    }, {name: loss.fields for name, loss in LOSSES.items()})


def loss_values(config: Any) -> dict[str, Any]:
    """The chosen loss's fields (``{field: value}``) from a validated config."""
    name = config.loss.name
    return part_values(config.loss, name, LOSSES.lookup(name).fields)


def make_loss(config: Any, traced: dict[str, Any] | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``loss(logits, targets) -> [B]`` for the config's loss, with its fields from the config
    or (traceable ones) from ``traced`` (a packed trial's values)."""
    entry = LOSSES.lookup(config.loss.name)
    params = {**loss_values(config), **(traced or {})}
    return lambda logits, targets: entry.fn(logits, targets, **params)


@register(DEFAULT)
def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Categorical cross-entropy of the softmax (Keras' ``from_logits=True``)."""
    return optax.softmax_cross_entropy(logits, targets)


@register("focal", gamma=Field(2.0, float, at_least(0),
                               "focusing exponent: (1 - p)^gamma down-weights easy examples",
                               traceable=True))
def focal(logits: jax.Array, targets: jax.Array, *, gamma: Any) -> jax.Array:
    """Multi-class focal loss (Lin et al. 2017) on soft targets: ``-sum_k t_k (1 - p_k)^gamma
    log p_k``; ``gamma = 0`` is the cross-entropy."""
    logp = jax.nn.log_softmax(logits)
    # (1 - p)^gamma as exp(gamma log(1 - p)), clipped: finite gradients where p rounds to 1
    weight = jnp.exp(gamma * jnp.log(jnp.clip(1.0 - jnp.exp(logp), 1e-12, 1.0)))
    return -jnp.sum(targets * weight * logp, axis=-1)
