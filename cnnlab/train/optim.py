"""Optimizers and learning-rate schedules by name (registries), built from a config with optax.

Hyperparameters are arguments: :func:`make_optimizer` takes ``hparams`` that may be traced (one
value per packed sweep trial). Schedules are built for a unit learning rate and scaled by
``optimizer.learning_rate``, which is therefore always traceable; the other traceable fields
are declared by the optimizer that owns them. A user adds one in their own module::

    @register_optimizer("lion", traceable=("b1", "b2"))
    def lion(o, learning_rate):  # o: the optimizer config, attribute access
        return optax.lion(learning_rate, b1=o.b1, b2=o.b2, weight_decay=0.0)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import optax

from cnnlab._registry import Registry

OptimizerFn = Callable[[Any, optax.Schedule], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """``build(o, learning_rate)``, the config fields it lets be traced, and whether it applies
    ``weight_decay`` itself (else :func:`make_optimizer` adds a decay stage for a nonzero one)."""

    build: OptimizerFn
    traceable: tuple[str, ...] = ()
    applies_weight_decay: bool = False


OPTIMIZERS = Registry("optimizer", {})
SCHEDULES = Registry("schedule", {})


def register_optimizer(
    name: str, *, traceable: Sequence[str] = (), applies_weight_decay: bool = False
) -> Callable[[OptimizerFn], OptimizerFn]:
    """Decorator registering ``build(o, learning_rate)`` as ``optimizer.name = name``."""

    def decorator(fn: OptimizerFn) -> OptimizerFn:
        OPTIMIZERS.register(name, Optimizer(fn, tuple(traceable), applies_weight_decay), module=fn.__module__)
        return fn

    return decorator


def register_schedule(name: str) -> Callable[[Callable[..., optax.Schedule]], Callable[..., optax.Schedule]]:
    """Decorator registering ``fn(s, *, steps, steps_per_epoch) -> optax.Schedule`` as
    ``schedule.name = name``: the learning-rate multiplier (1 at its start) over the ``steps``
    updates after warmup, for the schedule config ``s``."""
    return SCHEDULES.register(name)


register_optimizer("adam", traceable=("b1", "b2", "eps"))(
    lambda o, lr: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps))
register_optimizer("adamw", traceable=("b1", "b2", "eps", "weight_decay"), applies_weight_decay=True)(
    lambda o, lr: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
register_optimizer("sgd")(  # momentum is structure: a zero momentum has no trace stage
    lambda o, lr: optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov))
register_optimizer("rmsprop", traceable=("rho", "eps", "momentum"))(
    lambda o, lr: optax.rmsprop(lr, decay=o.rho, eps=o.eps, momentum=o.momentum))

register_schedule("constant")(lambda s, *, steps, steps_per_epoch: optax.constant_schedule(1.0))
# Keras 2's ``decay`` argument: ``lr / (1 + decay * iterations)``, updated every step.
register_schedule("keras_decay")(lambda s, *, steps, steps_per_epoch: lambda c: 1.0 / (1.0 + s.decay * c))
register_schedule("cosine")(
    lambda s, *, steps, steps_per_epoch: optax.cosine_decay_schedule(1.0, steps, alpha=s.min_lr_ratio))
register_schedule("step")(lambda s, *, steps, steps_per_epoch: optax.exponential_decay(
    1.0, transition_steps=max(s.step_epochs * steps_per_epoch, 1), decay_rate=s.step_factor, staircase=True))


def make_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, *, learning_rate: Any = None
) -> optax.Schedule:
    """``schedule.name``'s schedule of ``learning_rate`` (default ``optimizer.learning_rate``; may
    be traced) over ``steps_per_epoch`` updates per epoch, after ``schedule.warmup_epochs`` of
    linear warmup from 0."""
    s = config.schedule
    lr = config.optimizer.learning_rate if learning_rate is None else learning_rate
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    total = max(config.num_epochs * steps_per_epoch, 1)
    unit = SCHEDULES.lookup(s.name)(s, steps=max(total - warmup, 1), steps_per_epoch=steps_per_epoch)
    if warmup:
        unit = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), unit], [warmup])
    return lambda count: lr * unit(count)


def learning_rate_at(config: ml_collections.ConfigDict, steps_per_epoch: int, step: int) -> float:
    """The learning rate that the update of batch ``step`` (0-based global step) uses under
    :func:`make_optimizer` for ``config`` (``grad_accum_steps`` batches share one update)."""
    accum = config.grad_accum_steps
    schedule = make_schedule(config, max(steps_per_epoch // accum, 1))
    return float(schedule(int(step) // accum))


def traceable_optimizer_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The ``optimizer`` fields that may be traced (differ between packed trials) for this
    config: ``learning_rate``, the optimizer's declared fields, and ``weight_decay`` /
    ``grad_clip_norm`` where their stage exists (a nonzero value in the config)."""
    o = config.optimizer
    entry = OPTIMIZERS.lookup(o.name)
    fields = ["learning_rate", *entry.traceable]
    if o.weight_decay and not entry.applies_weight_decay:
        fields.append("weight_decay")
    if o.grad_clip_norm:
        fields.append("grad_clip_norm")
    return tuple(fields)


def make_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    hparams: Mapping[str, Any] | None = None,
) -> optax.GradientTransformation:
    """``optax.chain`` of optional gradient clipping, a decay stage (``add_decayed_weights``,
    unless the optimizer applies ``weight_decay`` itself) and the named optimizer on its
    schedule; in ``optax.MultiSteps`` when ``grad_accum_steps > 1``.

    Args:
        config: the training config (``optimizer``, ``schedule``, ``num_epochs``,
            ``grad_accum_steps``).
        steps_per_epoch: batches per epoch (``grad_accum_steps`` batches make one update).
        hparams: ``{optimizer field: value}`` overriding the config's, e.g. a packed trial's
            tracers; only :func:`traceable_optimizer_fields`. Which stages exist follows the
            config's values, so the state structure does not depend on ``hparams``.

    Raises:
        ValueError: an unknown optimizer or schedule, or an ``hparams`` field that cannot be
            traced for this config.
    """
    o = config.optimizer
    entry = OPTIMIZERS.lookup(o.name)
    hparams = dict(hparams or {})
    allowed = traceable_optimizer_fields(config)
    bad = sorted(set(hparams) - set(allowed))
    if bad:
        raise ValueError(
            f"optimizer field(s) {bad} cannot be traced for optimizer {o.name!r} with this config; "
            f"traceable: {list(allowed)}."
        )
    h = types.SimpleNamespace(**{**o.to_dict(), **hparams})
    updates_per_epoch = max(steps_per_epoch // config.grad_accum_steps, 1)
    schedule = make_schedule(config, updates_per_epoch, learning_rate=h.learning_rate)
    parts = []
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(h.grad_clip_norm))
    if o.weight_decay and not entry.applies_weight_decay:
        parts.append(optax.add_decayed_weights(h.weight_decay))
    parts.append(entry.build(h, schedule))
    tx = optax.chain(*parts)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps).gradient_transformation()
    return tx
