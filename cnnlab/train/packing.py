"""Packing: K >= 1 trials as one set of jit-compiled programs (the trainer's loop runs them).

K = 1 is an ordinary run: the plain train step on a plain state. K > 1 stacks the trials'
states on a leading trial axis and maps the same step over it, with the hyperparameters in
which the trials differ passed as traced ``[K]`` arrays. Either way every traceable field that
is nonzero in some trial is a traced argument (:func:`traced_values`), so a trial's
hyperparameter arithmetic is the same float32 arithmetic packed or alone. Which fields may differ is declared
by their owners, not listed here: a model's traceable fields (``cnnlab.models.traceable_fields``),
an optimizer's (``cnnlab.train.optim.traceable_optimizer_fields``), an augmentation op's
(``augment_pipeline(...).traceable()``), plus ``seed`` and the validation fold ``data.fold``
(each trial then reads its own fold's training and validation images). :func:`pack_key` is equal exactly for
configs that can share a program. Each packed trial computes what it computes alone, so its
metrics equal the same config trained alone (tested), and its checkpoints are ordinary run
checkpoints.

On CPU, where XLA runs the grouped convolutions that ``vmap`` produces slowly, the trials are
laid side by side in the program instead (``vmap_width``, see :func:`over_trials`). With
several devices in one process the trial axis is split over them when K divides evenly;
otherwise (and with several processes) the batch axis is, as in a single run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnnlab import data as data_lib
from cnnlab import models, nn
from cnnlab.schema import flatten, keys_without_effect
from cnnlab.train import finetune, losses, optim
from cnnlab.train.config import train_schema
from cnnlab.train.experiment import Experiment, initial_state, resolve
from cnnlab.train.steps import (
    STEPS,
    TrainState,
    chunk_unroll,
    create_train_state,
    make_eval_step,
    zero_sums,
)


class NotPackable(ValueError):
    """The configs cannot share one program (the sweep then runs them one at a time)."""


@dataclasses.dataclass
class TrialOutcome:
    """How one trial ended: ``metrics`` (its last evaluation record), ``pruned`` (stopped by
    ``on_epoch_end``) or ``error`` (e.g. :class:`~cnnlab.train.NonFiniteLossError`)."""

    metrics: dict[str, Any]
    pruned: bool = False
    error: BaseException | None = None


# ---------------------------------------------------------------------------------------------
# What trials may differ in
# ---------------------------------------------------------------------------------------------


def _model_field(config: ml_collections.ConfigDict, name: str) -> Any:
    """``model.kwargs.<name>``, or the model's default when the config leaves it out."""
    if name in config.model.kwargs:
        return config.model.kwargs[name]
    fields = {f.name: f for f in dataclasses.fields(models.MODELS[config.model.name])}
    return fields[name].default if name in fields else None


def _pipeline(config: ml_collections.ConfigDict, num_classes: int = 2):
    return data_lib.augment_pipeline(config.data.augment, num_classes)


def traceable_values(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``{config key: value}`` of every field this (validated) config may trace: the model's,
    the optimizer's and the augmentation ops' declared fields."""
    values = {}
    for f in models.traceable_fields(config.model.name):
        v = _model_field(config, f)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values[f"model.kwargs.{f}"] = float(v)
    for key in optim.traceable_optimizer_fields(config):
        values[key] = float(optim.config_value(config, key))
    for k, v in _pipeline(config).traceable().items():
        values[f"data.augment.{k}"] = float(v)
    loss_fields = losses.loss_values(config)
    for f in losses.LOSSES.lookup(config.loss.name).traceable():
        values[f"loss.{config.loss.name}.{f}"] = float(loss_fields[f])
    return values


def pack_key(config: ml_collections.ConfigDict) -> str:
    """Equal for configs that can be trained in one packed program."""
    config = resolve(config)
    flat = {k: v for k, v in flatten(config).items() if not k.startswith("data.augment.")}
    for key in (*traceable_values(config), "seed", "data.fold", *keys_without_effect(train_schema())):
        flat.pop(key, None)
    flat["data.augment"] = _pipeline(config).structure()
    # Whether an optimizer stage exists (e.g. decoupled weight decay) shows in its state's
    # structure, which packed trials must share with their own single runs.
    probe = {"w": jax.ShapeDtypeStruct((1,), jnp.float32)}
    opt_state = jax.eval_shape(optim.make_optimizer(config, 1).init, probe)
    flat["optimizer.state"] = str(jax.tree_util.tree_structure(opt_state))
    return json.dumps(flat, sort_keys=True, default=str)


def varying(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """``{config key: float32 [K]}`` for each traceable field whose value differs between the
    (validated) configs."""
    rows = [traceable_values(c) for c in configs]
    return {
        key: np.asarray([r[key] for r in rows], np.float32)
        for key in rows[0]
        if len({r[key] for r in rows}) > 1
    }


def traced_values(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """``{config key: float32 [K]}`` (a float32 scalar for K = 1) of the traceable fields that
    the programs of ``configs`` take as traced arguments: every one that is nonzero in some
    trial, whether or not the trials differ in it, and for a single run too.

    So a trial's hyperparameter arithmetic is the same float32 arithmetic packed or alone (a
    Python constant would be folded in float64: ``1 - b1`` differs from float32's by an ulp,
    which training grows). A field that is zero in every trial stays a constant, so that its
    stage (a dropout, a penalty, an augmentation) is left out of the program; a traced zero
    computes exactly what the left-out stage does, as the packing tests check."""
    rows = [traceable_values(c) for c in configs]
    if len(configs) == 1:
        return {key: np.float32(v) for key, v in rows[0].items() if v != 0}
    return {key: np.asarray([r[key] for r in rows], np.float32)
            for key in rows[0] if any(r[key] != 0 for r in rows)}


# ---------------------------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------------------------


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def over_trials(fn: Callable, num_trials: int, vmap_width: int, shared: bool) -> Callable:
    """``fn(a, b, batch)`` for one trial -> the same over a leading trial axis of ``a`` and ``b``
    (and of ``batch`` unless ``shared``), as one traced function.

    ``jax.vmap`` over the trial axis turns each convolution into a grouped convolution, which
    GPUs run fast but XLA's CPU backend runs about 3x slower per trial than separate ones (and
    ``lax.map``, a loop in the program, 25x slower). So with ``vmap_width < num_trials`` the
    trials are laid out side by side in the program in groups of ``vmap_width`` (1: each trial
    its own ungrouped copy of the step): one program, one dispatch, one data transfer, each
    trial computing exactly what it computes alone.
    """
    batch_axis = None if shared else 0
    if vmap_width >= num_trials:
        return jax.vmap(fn, in_axes=(0, 0, batch_axis))
    width = max(vmap_width, 1)
    chunk_fn = fn if width == 1 else jax.vmap(fn, in_axes=(0, 0, batch_axis))

    def unrolled(a, b, batch):
        outs = []
        for start in range(0, num_trials, width):
            idx = slice(start, start + width) if width > 1 else start
            take = lambda t, idx=idx: jax.tree_util.tree_map(lambda x: x[idx], t)  # noqa: E731
            outs.append(chunk_fn(take(a), take(b), batch if shared else take(batch)))
        if width == 1:
            return _stack(outs)
        return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)

    return unrolled


@dataclasses.dataclass
class Program:
    """The jitted programs of a group of ``size`` trials and how its arrays are laid out.

    ``train_step(states, h, batch)`` / ``train_chunk(states, h, batches)`` (``steps_per_dispatch``
    steps under ``lax.scan``) -> ``(states, metrics)`` (the variables of the loss's extra inputs,
    e.g. a teacher's weights, are an argument of the compiled program, shared by the trials);
    ``eval_sums(states, batch)`` -> summed metrics of each trial on one batch;
    ``eval_sums_each(states, batches)`` -> the same with each trial its own batch (``[K, B, ...]``,
    e.g. its own validation fold); ``trials(states)`` -> one state per trial;
    ``stack(states_list)``. ``shared``: every trial reads the same training batches (equal seeds
    and folds). With one trial every tree is a single trial's (no trial axis).
    """

    size: int
    seeds: list[int]
    folds: list[int]
    shared: bool
    h: dict[str, Any]
    train_step: Callable
    train_chunk: Callable
    eval_sums: Callable
    eval_sums_each: Callable | None
    reset_sums: Callable
    trials: Callable
    stack: Callable
    init: Callable
    chunk_sharding: NamedSharding
    eval_sharding: NamedSharding
    eval_each_sharding: NamedSharding
    vmap_width: int

    def take(self, tree: Any, k: int) -> Any:
        """Trial ``k``'s part of a host tree."""
        return tree if self.size == 1 else jax.tree_util.tree_map(lambda x: x[k], tree)


def build_program(
    exp: Experiment, configs: Sequence[ml_collections.ConfigDict], *, vmap_width: int | None = None
) -> Program:
    """The programs for ``configs`` (validated, equal :func:`pack_key` when more than one); the
    train step is built by the ``config.train_step`` registered in
    :data:`cnnlab.train.steps.STEPS`, one trial's step wrapped over the trials."""
    config = exp.config
    K = len(configs)
    seeds = [int(c.seed) for c in configs]
    folds = [int(c.data.fold) for c in configs]
    shared = len(set(zip(seeds, folds))) == 1
    h_host = traced_values(configs)
    model_keys = [k for k in h_host if k.startswith("model.kwargs.")]
    opt_keys = [k for k in h_host if k.startswith(("optimizer.", "schedule.", "ema."))]
    aug_keys = [k for k in h_host if k.startswith("data.augment.")]
    loss_keys = [k for k in h_host if k.startswith("loss.")]
    pipeline = data_lib.augment_pipeline(config.data.augment, exp.num_classes)
    constraints = nn.collect_constraints(
        exp.model, jnp.zeros((1, *exp.image_shape), jnp.float32), training=False
    )

    make_step = STEPS.lookup(config.train_step)
    loss_metrics = losses.metric_names(config)
    kept_stats = finetune.kept_stats_layers(config, finetune.variable_shapes(exp))

    def input_variables() -> Any:
        """The loss's extra-input variables (set up on the first training call, so that a
        program built to evaluate never loads a teacher); ``None`` when it takes none."""
        inputs = exp.loss_inputs()
        return None if inputs is None else inputs.variables

    def train_step(state: TrainState, h: dict[str, jax.Array], batch, variables: Any):
        """One trial's step with its traced hyperparameters ``h`` (:func:`traced_values`) and
        the (traced) variables of the loss's extra inputs."""
        model = exp.model_with(**{k.split(".")[-1]: h[k] for k in model_keys}) if model_keys else exp.model
        tx = (optim.make_optimizer(config, exp.steps_per_epoch, {k: h[k] for k in opt_keys})
              if opt_keys else exp.tx)
        traced = {k[len("data.augment."):]: h[k] for k in aug_keys} or None

        def preprocess(key, images, labels):
            images, targets = pipeline(key, images, labels, traced)
            return exp.normalize(images), targets

        loss_fn = losses.make_loss(config, {k.split(".")[-1]: h[k] for k in loss_keys})
        inputs = exp.loss_inputs()
        loss_inputs = None if inputs is None else (lambda images: inputs.apply(variables, images))
        step = make_step(model, tx, num_classes=exp.num_classes, preprocess=preprocess,
                         constraints=constraints, label_smoothing=config.loss.label_smoothing,
                         loss_fn=loss_fn, loss_inputs=loss_inputs)
        new, metrics = step(state, batch)
        if kept_stats:  # config.freeze_batch_stats: frozen layers keep their moving statistics
            new = new.replace(batch_stats=finetune.keep_stats(new.batch_stats, state.batch_stats, kept_stats))
        return new, metrics

    eval_one = make_eval_step(exp.model, num_classes=exp.num_classes, normalize=exp.normalize,
                              metrics=tuple(config.metrics), flip=config.eval_flip,
                              views=config.eval_views)
    mesh = exp.mesh
    n_dev = len(mesh.devices.flat)
    if K == 1:
        vmap_width = 1
        trial_step = train_step

        def eval_step(st, batch):
            return eval_one(st.params, st.batch_stats, batch)
        eval_each = None
        trials = lambda st: (st,)  # noqa: E731
        stack = lambda states: states[0]  # noqa: E731
        trial_axis = None
    else:
        if vmap_width is None or vmap_width <= 0:  # vmap where batched convolutions are fast
            vmap_width = 1 if jax.devices()[0].platform == "cpu" else K
        vmap_width = min(int(vmap_width), K)

        def trial_step(st, h, batch, variables):  # the loss inputs' variables: shared, not mapped
            return over_trials(lambda s, hk, b: train_step(s, hk, b, variables), K, vmap_width,
                               shared)(st, h, batch)
        veval = over_trials(eval_one, K, vmap_width, shared=True)
        veval_each = over_trials(eval_one, K, vmap_width, shared=False)

        def eval_step(st, batch):
            return veval(st.params, st.batch_stats, batch)

        def eval_each(st, batches):
            return veval_each(st.params, st.batch_stats, batches)
        trials = jax.jit(lambda st: tuple(jax.tree_util.tree_map(lambda x, k=k: x[k], st) for k in range(K)))
        trial_axis = "data" if n_dev > 1 and K % n_dev == 0 and jax.process_count() == 1 else None
        stack_jit = jax.jit(lambda *trees: _stack(trees),
                            out_shardings=NamedSharding(mesh, PartitionSpec(trial_axis)))

        def stack(states):
            return stack_jit(*states)
    # Batches split over the devices along the batch axis, as in a single run, unless the
    # trial axis is (then each device sees every batch of its trials).
    if trial_axis:
        chunk_spec = PartitionSpec() if shared else PartitionSpec(None, trial_axis)
        eval_spec, eval_each_spec = PartitionSpec(), PartitionSpec(trial_axis)
    else:
        chunk_spec = PartitionSpec(None, "data") if shared else PartitionSpec(None, None, "data")
        eval_spec, eval_each_spec = PartitionSpec("data"), PartitionSpec(None, "data")
    h = jax.device_put({k: jnp.asarray(v) for k, v in h_host.items()},
                       NamedSharding(mesh, PartitionSpec(trial_axis) if K > 1 else PartitionSpec()))

    def init() -> TrainState:
        if K == 1:
            return initial_state(exp)
        # One program for every seed (a traced argument), called once per distinct seed.
        one = jax.jit(lambda s: create_train_state(exp.model, exp.tx, seed=s, image_shape=exp.image_shape,
                                                   loss_metrics=loss_metrics))
        by_seed = {s: one(jnp.int32(s)) for s in sorted(set(seeds))}
        return stack([by_seed[s] for s in seeds])

    if K == 1:
        reset = lambda st: st.replace(epoch_sums=zero_sums(loss_metrics))  # noqa: E731
    else:
        reset = lambda st: st.replace(epoch_sums=jax.vmap(lambda _: zero_sums(loss_metrics))(st.step))  # noqa: E731
    step_jit = jax.jit(trial_step, donate_argnums=0)
    chunk_jit = jax.jit(
        lambda st, h, batches, v: jax.lax.scan(lambda s, b: trial_step(s, h, b, v), st, batches,
                                               unroll=chunk_unroll()),
        donate_argnums=0,
    )
    return Program(
        size=K, seeds=seeds, folds=folds, shared=shared, h=h,
        train_step=lambda st, h, batch: step_jit(st, h, batch, input_variables()),
        train_chunk=lambda st, h, batches: chunk_jit(st, h, batches, input_variables()),
        eval_sums=jax.jit(eval_step),
        eval_sums_each=None if eval_each is None else jax.jit(eval_each),
        reset_sums=jax.jit(reset, donate_argnums=0),
        trials=trials, stack=stack, init=init,
        chunk_sharding=NamedSharding(mesh, chunk_spec),
        eval_sharding=NamedSharding(mesh, eval_spec),
        eval_each_sharding=NamedSharding(mesh, eval_each_spec),
        vmap_width=vmap_width,
    )
