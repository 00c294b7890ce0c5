"""Optimizers and learning-rate schedules by name, built from a config with optax."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import optax


def keras_legacy_decay(learning_rate: float, decay: float) -> optax.Schedule:
    """Keras 2's ``decay`` argument: ``lr / (1 + decay * iterations)``, updated every step."""

    def schedule(count):
        return learning_rate / (1.0 + decay * count)

    return schedule


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The learning-rate schedule named by ``config.schedule.name``."""
    lr = config.optimizer.learning_rate
    s = config.schedule
    total = max(config.num_epochs * steps_per_epoch, 1)
    if s.name == "constant":
        schedule = optax.constant_schedule(lr)
    elif s.name == "keras_decay":
        schedule = keras_legacy_decay(lr, s.decay)
    elif s.name == "cosine":
        warmup = int(round(s.warmup_epochs * steps_per_epoch))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else lr,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=lr * s.min_lr_ratio,
        )
    elif s.name == "step":
        schedule = optax.exponential_decay(
            lr, transition_steps=max(s.step_epochs * steps_per_epoch, 1), decay_rate=s.step_factor,
            staircase=True,
        )
    else:
        raise ValueError(f"Unknown schedule {s.name!r}.")
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), lambda c: schedule(c)], [warmup]
        )
    return schedule


_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": lambda o, lr: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
    "adamw": lambda o, lr: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    "sgd": lambda o, lr: optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov),
    "rmsprop": lambda o, lr: optax.rmsprop(lr, decay=o.rho, eps=o.eps, momentum=o.momentum),
}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """``optax.chain`` of optional gradient clipping, decoupled weight decay (sgd/rmsprop) and
    the named optimizer driven by the schedule."""
    o = config.optimizer
    if o.name not in _OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {o.name!r}. Known: {sorted(_OPTIMIZERS)}.")
    parts = []
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.weight_decay and o.name in ("sgd", "rmsprop", "adam"):
        parts.append(optax.add_decayed_weights(o.weight_decay))
    parts.append(_OPTIMIZERS[o.name](o, make_schedule(config, steps_per_epoch)))
    return optax.chain(*parts)
