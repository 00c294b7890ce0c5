"""Optimizers and learning-rate schedules by name (registries), each owning its config fields,
built from a config with optax.

Shared fields sit in the ``optimizer`` section (``name``, ``learning_rate``, ``weight_decay``,
``weight_decay_mask``, ``grad_clip_norm``, ``lr_multipliers``) and the ``schedule`` section (``name``, ``warmup_epochs``); an optimizer's or
schedule's own fields in a sub-section named after it (``optimizer.adam.b1``,
``schedule.cosine.min_lr_ratio``). Hyperparameters are arguments: :func:`make_optimizer` takes
``hparams`` that may be traced (one value per packed sweep trial); schedules are built for a unit
learning rate and scaled by ``optimizer.learning_rate``, which is therefore always traceable. A
user adds one in their own module (imported by their config file)::

    from cnnlab.schema import Field, in_range
    from cnnlab.train import optim

    @optim.register_optimizer("lion", b1=Field(0.9, float, in_range(0, 1), "...", traceable=True),
                              b2=Field(0.99, float, in_range(0, 1), "..."))
    def lion(learning_rate, *, b1, b2):
        return optax.lion(learning_rate, b1=b1, b2=b2)

and a config sets ``config.optimizer.name = "lion"`` and ``config.optimizer.lion.b1 = 0.95``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cnnlab._registry import Registry
from cnnlab.schema import (
    ConfigError,
    Field,
    Schema,
    at_least,
    chosen_part_section,
    greater_than,
    in_range,
    part_values,
    traceable_names,
)

OptimizerFn = Callable[..., optax.GradientTransformation]
ScheduleFn = Callable[..., optax.Schedule]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """``build(learning_rate, **fields)`` (plus ``weight_decay=`` when it ``applies_weight_decay``
    itself; otherwise :func:`make_optimizer` adds a decay stage for a nonzero one) and its
    config fields."""

    build: OptimizerFn
    fields: dict[str, Field]
    applies_weight_decay: bool = False

    def traceable(self) -> tuple[str, ...]:
        return traceable_names(self.fields)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``build(*, steps, steps_per_epoch, **fields) -> optax.Schedule``: the learning-rate
    multiplier (1 at its start) over the ``steps`` updates after warmup; and its config fields."""

    build: ScheduleFn
    fields: dict[str, Field]

    def traceable(self) -> tuple[str, ...]:
        return traceable_names(self.fields)


OPTIMIZERS = Registry("optimizer", {})
SCHEDULES = Registry("schedule", {})
_OPTIMIZER_SHARED = ("name", "learning_rate", "weight_decay", "weight_decay_mask", "grad_clip_norm",
                     "lr_multipliers")
_SCHEDULE_SHARED = ("name", "warmup_epochs")


def _check_name(name: str, reserved: tuple[str, ...], kind: str) -> None:
    if name in reserved:
        raise ValueError(f"{name!r} is a field of the {kind} section, not a {kind} name")


def register_optimizer(
    name: str, *, applies_weight_decay: bool = False, **fields: Field
) -> Callable[[OptimizerFn], OptimizerFn]:
    """Decorator registering ``build(learning_rate, **fields)`` as ``optimizer.name = name``,
    with its parameters ``fields`` (set as ``optimizer.<name>.<field>``; a ``traceable`` one may
    differ between packed trials). ``applies_weight_decay``: ``build`` also takes
    ``weight_decay=`` (decoupled decay of its own, as adamw) and ``decay_mask=`` (``None``, or
    ``params -> bool tree`` of the parameters to decay, as optax's ``mask``)."""
    _check_name(name, _OPTIMIZER_SHARED, "optimizer")

    def decorator(fn: OptimizerFn) -> OptimizerFn:
        OPTIMIZERS.register(name, Optimizer(fn, dict(fields), applies_weight_decay), module=fn.__module__)
        return fn

    return decorator


def register_schedule(name: str, **fields: Field) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator registering ``build(*, steps, steps_per_epoch, **fields) -> optax.Schedule`` as
    ``schedule.name = name``: the learning-rate multiplier (1 at its start) over the ``steps``
    updates after warmup, with its parameters ``fields`` (``schedule.<name>.<field>``)."""
    _check_name(name, _SCHEDULE_SHARED, "schedule")

    def decorator(fn: ScheduleFn) -> ScheduleFn:
        SCHEDULES.register(name, Schedule(fn, dict(fields)), module=fn.__module__)
        return fn

    return decorator


def optimizer_schema() -> Schema:
    """``optimizer``: the shared fields and each registered optimizer's own (read at call time,
    so a user's optimizers are included)."""
    return chosen_part_section("optimizer", {
        "name": Field("adam", str, choices=lambda: OPTIMIZERS, doc="registered optimizer"),
        "learning_rate": Field(1e-3, float, greater_than(0), "peak learning rate", traceable=True),
        "weight_decay": Field(0.0, float, at_least(0), "decoupled weight decay", traceable=True),
        "weight_decay_mask": Field("default", str, choices=("default", "all"), legacy="all",
                                   doc="which parameters weight_decay applies to: default (those "
                                   "with 2 or more dimensions: kernels, not biases or normalization "
                                   "scales/offsets) or all (runs recorded before this field resume "
                                   "with all, as they computed)"),
        "grad_clip_norm": Field(0.0, float, at_least(0), "clip gradients to this global norm (0: off)",
                                traceable=True),
        "lr_multipliers": Field((), tuple, _check_multipliers, convert=_multipliers,
                                doc="((regex, factor), ...): the updates of the parameters whose "
                                "'/'-joined path (e.g. Dense_1/kernel) the regex matches whole are "
                                "scaled by factor (the first matching pair wins; 0 freezes them)"),
    }, {name: o.fields for name, o in OPTIMIZERS.items()})


def _check_multipliers(value: tuple) -> str | None:
    for item in value:
        if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float))):
            return f"each item must be a (regex, factor) pair, not {item!r}"
        if item[1] < 0:
            return f"factor {item[1]} of {item[0]!r} must be >= 0"
        problem = regex_problem(item[0])
        if problem:
            return problem
    return None


def _multipliers(value: tuple) -> tuple[tuple[str, float], ...]:
    return tuple((str(regex), float(factor)) for regex, factor in value)


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a regular expression, or ``None``."""
    try:
        re.compile(pattern)
    except re.error as err:
        return f"{pattern!r} is not a regular expression: {err}"
    return None


def schedule_schema() -> Schema:
    """``schedule``: the shared fields and each registered schedule's own."""
    return chosen_part_section("schedule", {
        "name": Field("constant", str, choices=lambda: SCHEDULES, doc="registered learning-rate schedule"),
        "warmup_epochs": Field(0.0, float, at_least(0), "linear warm-up from 0, in epochs"),
    }, {name: s.fields for name, s in SCHEDULES.items()})


def _betas() -> dict[str, Field]:
    return {
        "b1": Field(0.9, float, in_range(0, 1), "first-moment decay", traceable=True),
        "b2": Field(0.999, float, in_range(0, 1), "second-moment decay", traceable=True),
        "eps": Field(1e-7, float, greater_than(0), "epsilon (Keras' default)", traceable=True),
    }


@register_optimizer("adam", **_betas())
def adam(learning_rate: Any, *, b1: Any, b2: Any, eps: Any) -> optax.GradientTransformation:
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


@register_optimizer("adamw", applies_weight_decay=True, **_betas())
def adamw(learning_rate: Any, *, b1: Any, b2: Any, eps: Any, weight_decay: Any,
          decay_mask: Any = None) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)


# momentum is structure, not traceable: a zero momentum has no trace stage
@register_optimizer("sgd", momentum=Field(0.9, float, in_range(0, 1), "momentum (0: none)"),
                    nesterov=Field(False, bool, doc="Nesterov momentum"))
def sgd(learning_rate: Any, *, momentum: float, nesterov: bool) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


@register_optimizer("rmsprop",
                    rho=Field(0.9, float, in_range(0, 1), "decay of the squared-gradient average",
                              traceable=True),
                    eps=Field(1e-7, float, greater_than(0), "epsilon (Keras' default)", traceable=True),
                    momentum=Field(0.0, float, in_range(0, 1), "momentum (0: none)", traceable=True))
def rmsprop(learning_rate: Any, *, rho: Any, eps: Any, momentum: Any) -> optax.GradientTransformation:
    return optax.rmsprop(learning_rate, decay=rho, eps=eps, momentum=momentum)


register_schedule("constant")(lambda *, steps, steps_per_epoch: optax.constant_schedule(1.0))


# Keras 2's ``decay`` argument: ``lr / (1 + decay * iterations)``, updated every step.
@register_schedule("keras_decay", decay=Field(0.0, float, at_least(0), "lr / (1 + decay * step)"))
def keras_decay(*, steps: int, steps_per_epoch: int, decay: Any) -> optax.Schedule:
    return lambda count: 1.0 / (1.0 + decay * count)


@register_schedule("cosine", min_lr_ratio=Field(0.0, float, in_range(0, 1, hi_open=False),
                                                "final lr / peak lr"))
def cosine(*, steps: int, steps_per_epoch: int, min_lr_ratio: Any) -> optax.Schedule:
    return optax.cosine_decay_schedule(1.0, steps, alpha=min_lr_ratio)


@register_schedule("step", epochs=Field(30, int, at_least(1), "epochs between decays"),
                   factor=Field(0.1, float, greater_than(0), "lr factor per decay"))
def step(*, steps: int, steps_per_epoch: int, epochs: int, factor: Any) -> optax.Schedule:
    return optax.exponential_decay(1.0, transition_steps=max(epochs * steps_per_epoch, 1),
                                   decay_rate=factor, staircase=True)


def make_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, *, learning_rate: Any = None,
    hparams: Mapping[str, Any] | None = None,
) -> optax.Schedule:
    """``schedule.name``'s schedule of ``learning_rate`` (default ``optimizer.learning_rate``; may
    be traced) over ``steps_per_epoch`` updates per epoch, after ``schedule.warmup_epochs`` of
    linear warmup from 0; ``hparams``: traced values of the schedule's fields (full config keys)."""
    s = config.schedule
    lr = config.optimizer.learning_rate if learning_rate is None else learning_rate
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    total = max(config.num_epochs * steps_per_epoch, 1)
    entry = SCHEDULES.lookup(s.name)
    fields = _with_traced(part_values(s, s.name, entry.fields), f"schedule.{s.name}.", hparams)
    unit = entry.build(steps=max(total - warmup, 1), steps_per_epoch=steps_per_epoch, **fields)
    if warmup:
        unit = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), unit], [warmup])
    return lambda count: lr * unit(count)


def _with_traced(values: dict[str, Any], prefix: str, hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """``values`` with the ``hparams`` under ``prefix`` (full config keys) in place."""
    traced = {k[len(prefix):]: v for k, v in (hparams or {}).items() if k.startswith(prefix)}
    return {**values, **traced}


def learning_rate_at(config: ml_collections.ConfigDict, steps_per_epoch: int, step: int) -> float:
    """The learning rate that the update of batch ``step`` (0-based global step) uses under
    :func:`make_optimizer` for ``config`` (``grad_accum_steps`` batches share one update)."""
    accum = config.grad_accum_steps
    schedule = make_schedule(config, max(steps_per_epoch // accum, 1))
    return float(schedule(int(step) // accum))


class EmaState(NamedTuple):
    """The state of :func:`with_ema`: the optimizer's own, the parameters' moving average and
    the number of updates averaged."""

    inner: Any
    ema: Any
    count: jax.Array


def ema_decay(config: ml_collections.ConfigDict) -> float:
    """``ema.decay`` (0: no model EMA; a run recorded before EMA existed has none)."""
    return float((config.get("ema") or {}).get("decay", 0.0))


def with_ema(tx: optax.GradientTransformation, decay: Any, warmup: bool) -> optax.GradientTransformation:
    """``tx`` that also keeps an exponential moving average of the parameters it produces (model
    EMA, as timm's ``ModelEmaV2``): after update ``t`` (1-based), ``ema = d * ema + (1 - d) *
    params`` with ``d = decay``, or ``min(decay, (1 + t) / (10 + t))`` with ``warmup`` (so the
    average follows the first updates closely). ``decay`` may be traced. The average is of the
    parameters the optimizer produces, before a constraint's projection."""

    def init(params):
        return EmaState(tx.init(params), jax.tree_util.tree_map(jnp.asarray, params),
                        jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        updates, inner = tx.update(updates, state.inner, params)
        new_params = optax.apply_updates(params, updates)
        t = (state.count + 1).astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t)) if warmup else jnp.asarray(decay, jnp.float32)
        ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, new_params)
        return updates, EmaState(inner, ema, state.count + 1)

    return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any:
    """The parameters' moving average kept in an optimizer state of :func:`make_optimizer`
    (``None`` when the config has no model EMA)."""
    return opt_state.ema if isinstance(opt_state, EmaState) else None


def traceable_optimizer_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The config keys of the optimizer and schedule fields that may be traced (differ between
    packed trials) for this config: ``optimizer.learning_rate``, the chosen optimizer's and
    schedule's traceable fields, and ``optimizer.weight_decay`` / ``optimizer.grad_clip_norm``
    where their stage exists (a nonzero value in the config)."""
    o, s = config.optimizer, config.schedule
    entry = OPTIMIZERS.lookup(o.name)
    fields = ["optimizer.learning_rate", *(f"optimizer.{o.name}.{f}" for f in entry.traceable())]
    if o.weight_decay or entry.applies_weight_decay:
        fields.append("optimizer.weight_decay")
    if o.grad_clip_norm:
        fields.append("optimizer.grad_clip_norm")
    fields += [f"schedule.{s.name}.{f}" for f in SCHEDULES.lookup(s.name).traceable()]
    if ema_decay(config):
        fields.append("ema.decay")
    return tuple(fields)


def config_value(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value of a traceable optimizer or schedule key (:func:`traceable_optimizer_fields`),
    a part's default where the config leaves it out."""
    section, *rest = key.split(".")
    if len(rest) == 1:
        return config[section][rest[0]]
    part, field = rest
    registry = OPTIMIZERS if section == "optimizer" else SCHEDULES
    return part_values(config[section], part, registry.lookup(part).fields)[field]


# ---------------------------------------------------------------------------------------------
# Per-parameter updates: frozen parameters, learning-rate multipliers, the weight-decay mask
# ---------------------------------------------------------------------------------------------


def path_name(keypath: Sequence[Any]) -> str:
    """The ``"/"``-joined name of a parameter's tree path, e.g. ``"Conv2D_0/kernel"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


def update_factor(config: ml_collections.ConfigDict) -> Callable[[str], float] | None:
    """``path -> factor`` on a parameter's updates: 0 for a parameter that ``config.freeze``
    matches, else the factor of the first ``optimizer.lr_multipliers`` pair whose regex matches
    the whole path, else 1; ``None`` when neither is set (no stage)."""
    freeze = [re.compile(p) for p in config.get("freeze", ())]
    pairs = [(re.compile(r), float(f)) for r, f in config.optimizer.get("lr_multipliers", ())]
    if not freeze and not pairs:
        return None

    def factor(path: str) -> float:
        if any(p.fullmatch(path) for p in freeze):
            return 0.0
        return next((f for r, f in pairs if r.fullmatch(path)), 1.0)

    return factor


def scale_by_path(factor: Callable[[str], float]) -> optax.GradientTransformation:
    """Stateless: each leaf of the updates times ``factor(its "/"-joined path)``; a factor of 0
    gives exact zeros (whatever the update), 1 leaves the leaf as it is."""

    def scaled(keypath, u):
        f = factor(path_name(keypath))
        return jnp.zeros_like(u) if f == 0 else u if f == 1 else u * jnp.asarray(f, u.dtype)

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(kind: str) -> Callable[[Any], Any] | None:
    """``optimizer.weight_decay_mask`` as optax's ``mask``: ``"default"`` decays the parameters
    with 2 or more dimensions (kernels), not biases and normalization scales/offsets; ``"all"``
    is ``None`` (no mask: every parameter, and the optimizer state of runs recorded before the
    field existed)."""
    if kind == "all":
        return None
    return lambda params: jax.tree_util.tree_map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    hparams: Mapping[str, Any] | None = None,
) -> optax.GradientTransformation:
    """``optax.chain`` of optional gradient clipping, a decay stage (``add_decayed_weights``,
    unless the optimizer applies ``weight_decay`` itself; over the parameters of
    ``optimizer.weight_decay_mask``) and the named optimizer on its schedule; in
    ``optax.MultiSteps`` when ``grad_accum_steps > 1``. With ``freeze`` or
    ``optimizer.lr_multipliers`` the chain starts by zeroing the frozen parameters' gradients
    (so they count in no clipping norm or moment) and ends by scaling each parameter's updates
    by its factor (:func:`update_factor`; exact zeros for the frozen ones, decay included). With a model EMA (:func:`with_ema`)
    when ``ema.decay > 0``.

    Args:
        config: the training config (``optimizer``, ``schedule``, ``num_epochs``,
            ``grad_accum_steps``).
        steps_per_epoch: batches per epoch (``grad_accum_steps`` batches make one update).
        hparams: ``{config key: value}`` overriding the config's, e.g. a packed trial's tracers;
            only :func:`traceable_optimizer_fields`. Which stages exist follows the config's
            values, so the state structure does not depend on ``hparams``.

    Raises:
        ValueError: an unknown optimizer or schedule, or an ``hparams`` key that cannot be
            traced for this config.
    """
    o = config.optimizer
    entry = OPTIMIZERS.lookup(o.name)
    hparams = dict(hparams or {})
    allowed = traceable_optimizer_fields(config)
    bad = sorted(set(hparams) - set(allowed))
    if bad:
        raise ValueError(
            f"field(s) {bad} cannot be traced for optimizer {o.name!r} with this config; "
            f"traceable: {list(allowed)}."
        )
    shared = {k: hparams.get(f"optimizer.{k}", o[k]) for k in ("learning_rate", "weight_decay", "grad_clip_norm")}
    own = _with_traced(part_values(o, o.name, entry.fields), f"optimizer.{o.name}.", hparams)
    updates_per_epoch = max(steps_per_epoch // config.grad_accum_steps, 1)
    schedule = make_schedule(config, updates_per_epoch, learning_rate=shared["learning_rate"], hparams=hparams)
    parts = []
    factor = update_factor(config)
    if factor is not None:
        parts.append(scale_by_path(lambda path: float(factor(path) != 0)))
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(shared["grad_clip_norm"]))
    mask = decay_mask(o.get("weight_decay_mask", "default"))
    if o.weight_decay and not entry.applies_weight_decay:
        parts.append(optax.add_decayed_weights(shared["weight_decay"], mask=mask))
    if entry.applies_weight_decay:
        own["weight_decay"] = shared["weight_decay"]
        if mask is not None:
            if "decay_mask" not in inspect.signature(entry.build).parameters:
                raise ConfigError(
                    f"config key 'optimizer.weight_decay_mask': optimizer {o.name!r} applies its own "
                    "weight decay and takes no decay_mask=; set optimizer.weight_decay_mask='all'")
            own["decay_mask"] = mask
    parts.append(entry.build(schedule, **own))
    if factor is not None:
        parts.append(scale_by_path(factor))
    tx = optax.chain(*parts)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps).gradient_transformation()
    if ema_decay(config):
        tx = with_ema(tx, hparams.get("ema.decay", config.ema.decay), bool(config.ema.warmup))
    return tx
