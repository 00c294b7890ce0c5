"""Training losses by name (a registry), each owning its config fields, as augmentation ops do.

A loss is ``fn(logits, targets, **inputs, **fields)``: float32 logits ``[B, K]`` and soft
targets ``[B, K]`` (one-hot, mixed by mixup/cutmix, smoothed by ``loss.label_smoothing``) to
one value per example ``[B]``, or to ``([B], {metric: [B]})``: the per-example loss and
per-example values it reports (the names it declares with ``metrics=``). The step averages the
loss and adds the layers' penalties; each metric is averaged like the loss (over the step's
batch and over the epoch) and logged as ``train/<metric>``. Its fields are set as
``loss.<name>.<field>``; a field declared ``traceable`` may differ between packed sweep trials;
a field whose default is ``None`` must be set when the loss is chosen. A user adds one in their
own module (imported by their config file)::

    from cnnlab.schema import Field, in_range
    from cnnlab.train import losses

    @losses.register("poly1", metrics=("ce",),
                     epsilon=Field(1.0, float, in_range(-1, 10), "weight of the first
                                   polynomial term", traceable=True))
    def poly1(logits, targets, *, epsilon):
        ce = optax.softmax_cross_entropy(logits, targets)
        pt = jnp.sum(targets * jax.nn.softmax(logits), -1)
        return ce + epsilon * (1 - pt), {"ce": ce}

and a config sets ``config.loss.name = "poly1"`` and ``config.loss.poly1.epsilon = 2.0``.

**Extra inputs.** A loss that needs more than the logits (a teacher's logits, features of a
frozen network) declares ``inputs=setup``. Before training, ``setup(config, *, num_classes,
image_shape, normalization)`` runs once on the host (it may load weights) and returns
:class:`LossInputs` ``(apply, variables)``. Inside the jitted step, ``apply(variables, images)``
gets the images the student sees, augmented and normalized (``[B, H, W, C]`` float32,
normalized as the run's ``normalization`` record says: ``{"normalization": "scale" |
"mean_std", "mean"?, "std"?}``), and returns ``{keyword: [B, ...]}``; the step passes these to
the loss as keyword arguments, under ``stop_gradient``. ``variables`` (a pytree of arrays) are
an argument of the compiled program, not constants folded into it, and are shared by packed
trials; ``setup`` must depend only on fields that packed trials share (not traceable ones). A
run that is only evaluated never calls ``setup``. The built-in ``distill`` loss
(:mod:`cnnlab.train.distill`: a teacher run's logits) is written this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cnnlab._registry import Registry
from cnnlab.schema import (
    Field,
    Schema,
    at_least,
    chosen_part_section,
    in_range,
    part_values,
    traceable_names,
)

LossFn = Callable[..., Any]
#: Record keys the trainer writes itself; a loss's metric may not take them.
RESERVED_METRICS = ("loss", "accuracy")


class LossInputs(NamedTuple):
    """What a loss's ``inputs`` setup returns: ``apply(variables, images [B, H, W, C]) ->
    {keyword: [B, ...]}`` and the ``variables`` (a pytree of arrays, e.g. a teacher's weights)
    that the compiled step takes as an argument."""

    apply: Callable[[Any, jax.Array], dict[str, jax.Array]]
    variables: Any = ()


InputsSetup = Callable[..., LossInputs]


@dataclasses.dataclass(frozen=True)
class Loss:
    """``fn(logits, targets, **inputs, **fields) -> [B] | ([B], {metric: [B]})``, its config
    fields, the names of the metrics it reports, and its ``inputs`` setup (or ``None``)."""

    fn: LossFn
    fields: dict[str, Field]
    metrics: tuple[str, ...] = ()
    inputs: InputsSetup | None = None

    def traceable(self) -> tuple[str, ...]:
        return traceable_names(self.fields)


LOSSES = Registry("loss", {})
DEFAULT = "softmax_cross_entropy"


def register(name: str, *, metrics: Sequence[str] = (), inputs: InputsSetup | None = None,
             **fields: Field) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn(logits, targets, **inputs, **fields)`` as ``loss.name = name``.

    Args:
      name: the registry name (``config.loss.name``).
      metrics: the names of the per-example values ``fn`` returns besides the loss (``fn`` then
        returns ``(loss [B], {metric: [B]})``), logged as ``train/<metric>``.
      inputs: ``setup(config, *, num_classes, image_shape, normalization) -> LossInputs``, for a
        loss needing more than the logits (see the module docstring).
      **fields: the loss's parameters, settable as ``loss.<name>.<field>``.
    """
    if name in ("name", "label_smoothing"):
        raise ValueError(f"{name!r} is a field of the loss section, not a loss name")
    metrics = tuple(metrics)
    bad = [m for m in metrics if not isinstance(m, str) or not m.isidentifier() or m in RESERVED_METRICS]
    if bad or len(set(metrics)) != len(metrics):
        raise ValueError(f"loss {name!r}: metrics={metrics!r} must be distinct identifiers other than "
                         f"{', '.join(RESERVED_METRICS)} (train/loss and train/accuracy are logged already)")

    def decorator(fn: LossFn) -> LossFn:
        LOSSES.register(name, Loss(fn, dict(fields), metrics, inputs), module=fn.__module__)
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


def metric_names(config: Any) -> tuple[str, ...]:
    """The metrics the config's loss reports besides the loss (``()`` for most losses): what
    the train state's ``epoch_sums["loss_metrics"]`` holds."""
    return LOSSES.lookup(config.loss.name).metrics


def make_loss(config: Any, traced: dict[str, Any] | None = None) -> LossFn:
    """``loss(logits, targets, **inputs) -> [B] | ([B], {metric: [B]})`` for the config's loss,
    with its fields from the config or (traceable ones) from ``traced`` (a packed trial's
    values)."""
    entry = LOSSES.lookup(config.loss.name)
    params = {**loss_values(config), **(traced or {})}
    return lambda logits, targets, **inputs: entry.fn(logits, targets, **inputs, **params)


def setup_inputs(config: Any, *, num_classes: int, image_shape: tuple[int, ...],
                 normalization: dict[str, Any]) -> LossInputs | None:
    """The config's loss's :class:`LossInputs` from its ``inputs`` setup (e.g. a teacher loaded
    from its run), or ``None`` for a loss that needs only the logits."""
    setup = LOSSES.lookup(config.loss.name).inputs
    if setup is None:
        return None
    return LossInputs(*setup(config, num_classes=num_classes, image_shape=tuple(image_shape),
                             normalization=dict(normalization)))


def split_output(output: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A loss's output as ``(loss [B], {metric: [B]})`` (no metrics for a plain ``[B]``)."""
    if isinstance(output, tuple):
        loss, metrics = output
        return loss, dict(metrics)
    return output, {}


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
