"""Packed trials: K shape-compatible trials trained as ONE jit-compiled program.

The train state of K trials is stacked on a leading trial axis and ``jax.vmap`` maps the
ordinary :func:`cnnlab.train.steps.make_train_step` over it; the per-trial hyperparameters ride
along as ``[K]`` arrays. Evaluation is vmapped the same way, so the data is read and sent to the
device once for all K trials, and the program is compiled once instead of K times. On CPU,
where XLA runs the grouped convolutions that vmap produces slowly, the trials are instead laid
side by side in the same program (``vmap_width``, see :func:`over_trials`). With several
devices the trial axis is sharded over them when K divides evenly.

What may differ between packed trials (:data:`PACKABLE_FIELDS`), and how it is traced:

* ``seed`` (initialization, dropout and augmentation streams, and the data order): the states
  are initialized under ``vmap`` over the seeds; trials that share one seed share each batch
  (``in_axes=None``), otherwise each trial gets its own batch stream, stacked on the trial axis,
  exactly the order it would see alone.
* ``optimizer.learning_rate`` (the schedule is built with learning rate 1 and scaled by the
  trial's value), ``optimizer.weight_decay``, ``optimizer.b1``/``b2``/``eps``: the optax chain of
  :func:`cnnlab.train.optim.make_optimizer` is rebuilt inside the vmapped step with those values
  as tracers. The optimizer state keeps the structure of a single run, so every trial's
  checkpoints are ordinary run checkpoints (``cnnlab train``/``eval`` read and resume them).
* ``model.kwargs.weight_decay`` (the models' L2 factor): the model is built with factor 1 and
  each sown penalty is multiplied by the trial's factor (checked to be linear before use).
* dropout rates (the model fields in :data:`DROPOUT_FIELDS`, e.g. StridedNet's ``dropout`` and
  ``head_dropout``): the model is rebuilt inside the vmapped step with the trial's rates as
  tracers, which :class:`cnnlab.nn.Dropout` accepts (a traced rate always draws its mask; at
  rate 0 the mask keeps everything, as skipping would).
* augmentation strengths (``data.augment.*`` of
  :data:`cnnlab.data.transforms.TRACEABLE_STRENGTHS`: rotation, shift, shear and zoom ranges in
  their float forms, mixup and cutmix alphas): passed as tracers to the augment function. Which
  of them are lists or int pixel ranges, which flips and fill modes, and whether mixup/cutmix
  is on at all (alpha > 0) stay part of the program.

Everything else (model structure, data, batch size, epochs, schedule shape, label smoothing,
which optimizer, whether a decoupled weight-decay stage exists) must be equal: :func:`pack_key`
is equal exactly for configs that can share a program.

Each packed trial leaves an ordinary run directory: ``config.json``, ``classes.json``,
``metrics.jsonl``, latest/best checkpoints, ``confusion_last.npy`` and the reports, and its
metrics equal those of the same config trained alone by :func:`cnnlab.train.train_and_evaluate`
within float tolerance (``tests/test_sweep_packed.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cnnlab import data as data_lib
from cnnlab import models, nn
from cnnlab.data.config import resolve_augment_config
from cnnlab.data.transforms import TRACEABLE_STRENGTHS
from cnnlab.schema import copy_config, flatten
from cnnlab.train import optim as optim_lib
from cnnlab.train import report as report_lib
from cnnlab.train.checkpoint import Checkpoints
from cnnlab.train.config import validate_config
from cnnlab.train.steps import (
    TrainState,
    chunk_unroll,
    create_train_state,
    make_eval_step,
    make_train_step,
    zero_sums,
)
from cnnlab.train.trainer import (
    NonFiniteLossError,
    StopTraining,
    _crossed,
    build_experiment,
    eval_splits,
    metrics_from_sums,
    resolve_batch_size,
    train_record,
)
from cnnlab.train.writers import MetricWriter, write_json_atomic

#: Config fields whose values may differ between the trials of one pack, besides the models'
#: :data:`DROPOUT_FIELDS` and the float-form ``data.augment`` strengths (see :func:`pack_key`).
PACKABLE_FIELDS = (
    "seed",
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "model.kwargs.weight_decay",
)
#: Models whose sown penalties are all ``L2(model.kwargs.weight_decay)`` (so linear in it).
LINEAR_L2_MODELS = ("simple_cnn", "stridednet", "resnet", "inception")
#: Model fields that are dropout rates (used only as ``nn.Dropout`` rates), so packable.
DROPOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "simple_cnn": ("head_dropout",),
    "stridednet": ("dropout", "head_dropout"),
    "resnet": ("head_dropout",),
    "inception": ("head_dropout",),
}
_MIXING = ("mixup_alpha", "cutmix_alpha")
_OPT_HPARAMS = ("learning_rate", "weight_decay", "b1", "b2", "eps")
_FAULT_KILL_AT_STEP = "CNNLAB_FAULT_KILL_AT_STEP"  # the trainer's fault injection, honoured here


class NotPackable(ValueError):
    """The configs cannot share one program (the sweep then runs them one at a time)."""


def _decay_stage(config: ml_collections.ConfigDict) -> bool:
    # make_optimizer adds optax.add_decayed_weights only for these optimizers and a nonzero decay.
    o = config.optimizer
    return bool(o.weight_decay) and o.name in ("sgd", "rmsprop", "adam")


def _traceable_augment(cfg: dict[str, Any]) -> dict[str, bool]:
    """For each of TRACEABLE_STRENGTHS of a resolved augment config: whether its form traces
    (floats; a zero int is a zero float), as opposed to a list or an int pixel range."""
    def is_float(v):
        return isinstance(v, float) or (type(v) is int and v == 0)
    return {k: is_float(cfg[k]) for k in TRACEABLE_STRENGTHS}


def _augment_structure(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved augment config with each traceable strength replaced by what the program
    depends on (for mixup/cutmix: whether it is on)."""
    cfg = resolve_augment_config(config.data.augment)
    cfg.pop("preset")
    for k, traces in _traceable_augment(cfg).items():
        if traces:
            cfg[k] = ("on" if cfg[k] > 0 else "off") if k in _MIXING else "traced"
    return cfg


def _dropout_rates(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``{field: rate}`` of the model's dropout fields (config value or the model's default);
    raises ``ValueError`` naming a rate outside [0, 1]."""
    rates = {}
    for f in DROPOUT_FIELDS.get(config.model.name, ()):
        v = _model_field(config, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"Invalid model.kwargs.{f}={v!r}: expected a dropout rate in [0, 1].")
        rates[f] = float(v)
    return rates


def pack_key(config: ml_collections.ConfigDict) -> str | None:
    """Equal for configs that can be trained in one packed program; ``None`` when the config
    cannot be packed at all (multi-process runs)."""
    if jax.process_count() > 1:
        return None
    config = validate_config(config)
    flat = flatten(config)
    for key in PACKABLE_FIELDS:
        flat.pop(key, None)
    for f in _dropout_rates(config):
        flat.pop(f"model.kwargs.{f}", None)
    for key in [k for k in flat if k.startswith("data.augment.")]:
        del flat[key]
    flat["data.augment"] = _augment_structure(config)
    flat["progress"] = None
    flat["_decay_stage"] = _decay_stage(config)
    return json.dumps(flat, sort_keys=True, default=str)


@dataclasses.dataclass
class TrialOutcome:
    """How one packed trial ended: ``metrics`` (its last evaluation record), ``pruned`` (stopped
    by ``on_epoch_end``) or ``error`` (e.g. :class:`NonFiniteLossError`)."""

    metrics: dict[str, Any]
    pruned: bool = False
    error: BaseException | None = None


# ---------------------------------------------------------------------------------------------
# Per-trial hyperparameters as traced values
# ---------------------------------------------------------------------------------------------


def _model_field(config: ml_collections.ConfigDict, name: str) -> Any:
    """``model.kwargs.<name>``, or the model's default when the config leaves it out (``None``
    when the model has no such field)."""
    kwargs = config.model.kwargs
    if name in kwargs:
        return kwargs[name]
    field = {f.name: f for f in dataclasses.fields(models.MODELS[config.model.name])}.get(name)
    return None if field is None else field.default


def _varying(configs: Sequence[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """``{name: float32 [K]}`` for each hyperparameter whose value differs between trials:
    the optimizer's (``learning_rate`` ...), ``l2``, ``model/<dropout field>`` and
    ``augment/<strength>``."""
    columns: dict[str, list[float]] = {name: [] for name in (*_OPT_HPARAMS, "l2")}
    for c in configs:
        for name in _OPT_HPARAMS:
            columns[name].append(float(c.optimizer[name]))
        columns["l2"].append(float(_model_field(c, "weight_decay") or 0.0))
        for f, rate in _dropout_rates(c).items():
            columns.setdefault(f"model/{f}", []).append(rate)
        augment = resolve_augment_config(c.data.augment)
        for k, traces in _traceable_augment(augment).items():
            if traces:
                columns.setdefault(f"augment/{k}", []).append(float(augment[k]))
    return {
        name: np.asarray(values, np.float32)
        for name, values in columns.items()
        if len(set(values)) > 1
    }


class _ScaledPenalties:
    """Stands in for a Flax model in ``make_train_step``: ``apply`` runs the model (built with an
    L2 factor of 1) and multiplies every sown penalty by the trial's (traced) factor."""

    def __init__(self, model: Any, factor: jax.Array) -> None:
        self.model = model
        self.factor = factor

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.model.apply(variables, *args, **kwargs)
        if not kwargs.get("mutable"):
            return out
        logits, updates = out
        if nn.LOSSES in updates:
            scaled = jax.tree_util.tree_map(lambda v: v * self.factor, updates[nn.LOSSES])
            updates = {**updates, nn.LOSSES: scaled}
        return logits, updates


def _traced_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, h: dict[str, jax.Array]
) -> optax.GradientTransformation:
    """:func:`make_optimizer`'s chain with the trial's hyperparameters (tracers) in place of the
    config's constants; the same state structure."""
    o = config.optimizer
    steps = max(steps_per_epoch // config.grad_accum_steps, 1)
    if "learning_rate" in h:
        unit_config = copy_config(config)
        unit_config.optimizer.learning_rate = 1.0
        unit = optim_lib.make_schedule(unit_config, steps)
        lr = h["learning_rate"]

        def schedule(count):
            return lr * unit(count)
    else:
        schedule = optim_lib.make_schedule(config, steps)
    values = {name: h.get(name, o[name]) for name in _OPT_HPARAMS}
    traced_o = _Namespace({**o.to_dict(), **values})
    parts = []
    if o.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if _decay_stage(config):
        parts.append(optax.add_decayed_weights(values["weight_decay"]))
    parts.append(optim_lib._OPTIMIZERS[o.name](traced_o, schedule))
    tx = optax.chain(*parts)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx


class _Namespace(dict):
    """Attribute access over a dict (the optimizer registry reads ``o.b1`` etc.)."""

    __getattr__ = dict.__getitem__


def check_linear_penalties(model_for: Callable[[float], Any], image_shape, factors) -> None:
    """Raises :class:`NotPackable` unless the model's sown penalties scale linearly with its
    ``weight_decay`` (then the unit model times the factor equals the trial's model); the tests
    run it for every model in :data:`LINEAR_L2_MODELS`."""
    factors = sorted(set(float(v) for v in factors))
    x = jnp.zeros((1, *image_shape), jnp.float32)

    @jax.jit
    def penalties():
        unit = model_for(1.0)
        variables = unit.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, training=False)
        variables = {k: v for k, v in variables.items() if k != nn.LOSSES}

        def sown(model):
            _, updates = model.apply(variables, x, training=False, mutable=[nn.LOSSES])
            return updates.get(nn.LOSSES, {})

        return sown(unit), [sown(model_for(f)) for f in factors]

    base, got = jax.device_get(penalties())
    if not jax.tree_util.tree_leaves(base):
        raise NotPackable("The model sows no penalty with weight_decay=1.")
    for f, g in zip(factors, got):
        want = jax.tree_util.tree_map(lambda v, f=f: v * f, base)
        if f == 0.0 and not jax.tree_util.tree_leaves(g):
            continue
        ok = jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(want) and all(
            np.allclose(a, b, rtol=1e-5, atol=0)
            for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want))
        )
        if not ok:
            raise NotPackable("model.kwargs.weight_decay does not scale the model's penalties linearly.")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _slice(tree: Any, k: int) -> Any:
    return jax.tree_util.tree_map(lambda x: x[k], tree)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _host_chunks(exp, seeds: Sequence[int], start_step: int, shared: bool):
    """The training stream in chunks of ``steps_per_dispatch`` batches ``[S, B, ...]`` (one seed)
    or ``[S, K, B, ...]`` (each trial its own order); a chunk never crosses an epoch boundary."""
    config = exp.config
    streams = [
        data_lib.iterate_train(
            exp.dataset.train.images, exp.dataset.train.labels, config.batch_size,
            seed=int(s), start_step=start_step, num_epochs=config.num_epochs,
        )
        for s in (seeds[:1] if shared else seeds)
    ]
    step, pending = start_step, []
    for batches in zip(*streams):
        pending.append(batches[0] if shared else {k: np.stack([b[k] for b in batches]) for k in batches[0]})
        step += 1
        if len(pending) == config.steps_per_dispatch or step % exp.steps_per_epoch == 0:
            yield {k: np.stack([b[k] for b in pending]) for k in pending[0]}
            pending = []


@dataclasses.dataclass
class PackedProgram:
    """Everything :func:`train_packed` runs: the experiment (data, model, mesh) shared by the
    trials, the stacked initial states, the per-trial hyperparameters ``h`` (``[K]`` arrays) and
    the jitted programs: ``train_step(states, h, batch)``, ``train_chunk(states, h, batches)``
    (``steps_per_dispatch`` steps under ``lax.scan``), ``veval(params, batch_stats, batch)``."""

    exp: Any
    configs: list
    seeds: np.ndarray
    shared: bool
    h: dict
    states: TrainState
    train_step: Any
    train_chunk: Any
    reset_sums: Any
    unstack: Any
    veval: Any
    trial_sharding: Any
    chunk_sharding: Any
    vmap_width: int

    @property
    def size(self) -> int:
        return len(self.configs)


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


def build_packed(configs: Sequence[ml_collections.ConfigDict], *, vmap_width: int | None = None) -> PackedProgram:
    """Loads the data once and builds the packed programs and fresh states for ``configs``
    (equal :func:`pack_key`); raises :class:`NotPackable` otherwise. ``vmap_width``: trials
    vmapped together (see :func:`over_trials`); default: all of them on GPU/TPU, 1 on CPU."""
    keys = {pack_key(c) for c in configs}
    if len(keys) != 1 or None in keys:
        raise NotPackable("The configs differ in fields that are not packable: " + ", ".join(PACKABLE_FIELDS))
    K = len(configs)
    exp = build_experiment(configs[0])
    config = exp.config
    resolved = [resolve_batch_size(validate_config(c), len(exp.mesh.devices.flat)) for c in configs]
    seeds = np.asarray([c.seed for c in resolved], np.int32)
    shared = len(set(seeds.tolist())) == 1
    h_host = _varying(resolved)
    opt_traced = any(name in h_host for name in _OPT_HPARAMS)
    rate_fields = [k.split("/", 1)[1] for k in h_host if k.startswith("model/")]
    strength_names = [k for k in h_host if k.startswith("augment/")]

    kwargs = dict(config.model.kwargs.to_dict())
    if config.mixed_precision:
        kwargs["dtype"] = jnp.bfloat16

    def model_for(**overrides: Any):
        return models.get_model(config.model.name, num_classes=exp.num_classes, **{**kwargs, **overrides})

    unit_l2 = {}
    if "l2" in h_host:
        if config.model.name not in LINEAR_L2_MODELS:
            raise NotPackable(f"model.kwargs.weight_decay of {config.model.name!r} is not known to "
                              "scale its penalties linearly.")
        unit_l2 = {"weight_decay": 1.0}
    model = model_for(**unit_l2) if unit_l2 else exp.model

    def trial_model(h: dict[str, jax.Array]) -> Any:
        """The model with the trial's traced dropout rates (built inside the traced step)."""
        if not rate_fields:
            return model
        return model_for(**unit_l2, **{f: h[f"model/{f}"] for f in rate_fields})

    step_kwargs = dict(
        num_classes=exp.num_classes,
        constraints=nn.collect_constraints(exp.model, jnp.zeros((1, *exp.image_shape), jnp.float32), training=False),
        label_smoothing=config.loss.label_smoothing,
    )
    augment = data_lib.make_batch_augment_fn(config.data.augment, exp.num_classes)

    def preprocess_for(h: dict[str, jax.Array]) -> Callable:
        strengths = {name.split("/", 1)[1]: h[name] for name in strength_names}

        def preprocess(key, images, labels):
            images, targets = augment(key, images, labels, strengths or None)
            return exp.normalize(images), targets

        return preprocess

    def tx_for(h):
        return _traced_optimizer(config, exp.steps_per_epoch, h) if opt_traced else exp.tx

    if opt_traced:  # the traced chain must have a single run's state structure
        shapes = jax.eval_shape(
            lambda: create_train_state(exp.model, exp.tx, seed=0, image_shape=exp.image_shape)
        )
        h0 = {k: jnp.asarray(v[0]) for k, v in h_host.items() if k in _OPT_HPARAMS}
        got = jax.eval_shape(lambda: tx_for(h0).init(shapes.params))
        if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(shapes.opt_state):
            raise NotPackable("The traced optimizer's state differs from make_optimizer's.")

    def one_trial_step(state: TrainState, h: dict[str, jax.Array], batch):
        m = trial_model(h)
        m = _ScaledPenalties(m, h["l2"]) if "l2" in h else m
        step = make_train_step(m, tx_for(h), preprocess=preprocess_for(h), **step_kwargs)
        return step(state, batch)

    if vmap_width is None or vmap_width <= 0:  # vmap where batched convolutions are fast
        vmap_width = 1 if jax.devices()[0].platform == "cpu" else K
    vmap_width = min(int(vmap_width), K)
    vstep = over_trials(one_trial_step, K, vmap_width, shared)
    train_step = jax.jit(vstep, donate_argnums=0)
    train_chunk = jax.jit(
        lambda st, h, batches: jax.lax.scan(lambda s, b: vstep(s, h, b), st, batches, unroll=chunk_unroll()),
        donate_argnums=0,
    )
    unstack = jax.jit(lambda st: tuple(_slice(st, k) for k in range(K)))
    reset_sums = jax.jit(lambda st: st.replace(epoch_sums=jax.vmap(lambda _: zero_sums())(st.step)),
                         donate_argnums=0)
    eval_one = make_eval_step(model, num_classes=exp.num_classes, normalize=exp.normalize)
    veval = jax.jit(over_trials(eval_one, K, vmap_width, shared=True))

    # Trials go on the mesh's devices along the trial axis when they divide evenly.
    mesh = exp.mesh
    n_dev = len(mesh.devices.flat)
    trial_axis = "data" if n_dev > 1 and K % n_dev == 0 else None
    trial_sharding = NamedSharding(mesh, PartitionSpec(trial_axis))
    replicated = NamedSharding(mesh, PartitionSpec())
    chunk_sharding = replicated if shared else NamedSharding(mesh, PartitionSpec(None, trial_axis))
    h = jax.device_put({k: jnp.asarray(v) for k, v in h_host.items()}, trial_sharding)

    # One program for every seed (a traced argument), called once per distinct seed: compiling
    # the vmapped initializers is twice as slow on CPU, and the values are the same bits. The
    # states are stacked by one program (stacking leaf by leaf compiles one program per shape).
    init = jax.jit(lambda s: create_train_state(model, exp.tx, seed=s, image_shape=exp.image_shape))
    by_seed = {int(s): init(jnp.int32(s)) for s in sorted(set(seeds.tolist()))}
    stack = jax.jit(lambda *trees: _stack(trees), out_shardings=trial_sharding)
    states = stack(*[by_seed[int(s)] for s in seeds])

    return PackedProgram(
        exp=exp, configs=resolved, seeds=seeds, shared=shared, h=h, states=states,
        train_step=train_step, train_chunk=train_chunk, reset_sums=reset_sums, unstack=unstack,
        veval=veval, trial_sharding=trial_sharding, chunk_sharding=chunk_sharding,
        vmap_width=vmap_width,
    )


def train_packed(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    *,
    on_epoch_end: Callable[[int, int, dict[str, Any]], None] | None = None,
    tag: Callable[[int], str] | None = None,
    vmap_width: int | None = None,
) -> tuple[list[TrialOutcome], dict[str, float]]:
    """Trains ``configs`` (equal :func:`pack_key`) together, trial ``k`` in ``workdirs[k]``.

    Resumes when the workdirs hold checkpoints of one step. ``on_epoch_end(k, epoch, record)``
    is called for each running trial after each evaluation and may raise
    :class:`~cnnlab.train.StopTraining` (that trial stops; the others go on). A trial whose loss
    becomes non-finite stops with a :class:`~cnnlab.train.NonFiniteLossError` in its outcome.
    ``vmap_width``: see :func:`build_packed`.

    Returns each trial's :class:`TrialOutcome` and the pack's timings in seconds: ``setup``
    (data, model, initial states), ``first_step`` (compile and run), ``steps`` (the other
    training steps), ``eval`` (vmapped evaluation), ``save`` (checkpoints, metrics, reports).
    """
    t_start = time.perf_counter()
    timings = {"setup": 0.0, "first_step": 0.0, "train": 0.0, "eval": 0.0, "save": 0.0}
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("train_packed needs one workdir per config, and at least one config.")
    K = len(configs)
    tag = tag or (lambda k: f"[{k}]")
    prog = build_packed(configs, vmap_width=vmap_width)
    exp, config, resolved, seeds, shared = prog.exp, prog.exp.config, prog.configs, prog.seeds, prog.shared
    h, states, train_step, train_chunk = prog.h, prog.states, prog.train_step, prog.train_chunk
    reset_sums, unstack, veval = prog.reset_sums, prog.unstack, prog.veval
    trial_sharding, chunk_sharding = prog.trial_sharding, prog.chunk_sharding
    n_dev = len(exp.mesh.devices.flat)
    ckpts = [
        Checkpoints(wd, keep=config.checkpoint.keep, best_metric=config.checkpoint.best_metric,
                    best_mode=config.checkpoint.best_mode)
        for wd in workdirs
    ]
    starts = {c.latest_step() for c in ckpts}
    start_step = max(s or 0 for s in starts)
    total_steps = config.num_epochs * exp.steps_per_epoch
    if len(starts) != 1 or start_step >= total_steps:
        for c in ckpts:
            c.close()
        raise NotPackable(
            f"The trials' checkpoints are at different steps {sorted(map(str, starts))}."
            if len(starts) != 1 else "The trials finished training already (the trainer re-evaluates them)."
        )
    if start_step:
        restored = [c.restore(_slice(states, k))[0] for k, c in enumerate(ckpts)]
        states = jax.device_put(_stack(restored), trial_sharding)
        print(f"Resuming {K} packed trials from step {start_step}.", flush=True)
    for c, wd in zip(resolved, workdirs):
        os.makedirs(wd, exist_ok=True)
        write_json_atomic(os.path.join(wd, "config.json"), c.to_dict())
        write_json_atomic(os.path.join(wd, "classes.json"), list(exp.dataset.class_names))
    writers = [MetricWriter(wd, resume_step=start_step) for wd in workdirs]
    print(
        f"Training {K} packed trials of {config.model.name} on {len(exp.dataset.train.labels)} images "
        f"({exp.num_classes} classes), {config.num_epochs} epochs x {exp.steps_per_epoch} steps, batch "
        f"{config.batch_size}, {'one shared' if shared else 'per-trial'} data order, varying "
        f"{sorted(h) + ([] if shared else ['seed'])}, {prog.vmap_width} vmapped side by side, "
        f"{n_dev} device(s) [{jax.devices()[0].platform}].",
        flush=True,
    )

    active = [True] * K
    outcomes = [TrialOutcome(metrics={}) for _ in range(K)]
    kill_at = int(os.environ.get(_FAULT_KILL_AT_STEP, "-1"))
    step = start_step
    timings["setup"] = time.perf_counter() - t_start

    def check_finite(states) -> None:
        bad = np.asarray(jax.device_get(states.nonfinite_step))
        for k in range(K):
            if active[k] and bad[k] >= 0:
                last = ckpts[k].latest_step()
                outcomes[k].error = NonFiniteLossError(
                    f"Non-finite training loss at step {int(bad[k])}; stopping. "
                    + (f"The last good checkpoint (step {last}) is kept in {ckpts[k].latest.directory}."
                       if last is not None else "(no checkpoint was written yet).")
                )
                active[k] = False
                print(f"{tag(k)} stopped: {outcomes[k].error}", flush=True)

    def save_latest(states, step) -> None:
        t0 = time.perf_counter()
        trials = unstack(states)
        for k in range(K):
            if active[k]:
                ckpts[k].save_latest(step, trials[k])
        timings["save"] += time.perf_counter() - t0

    first = True
    t_window, n_window = time.perf_counter(), 0
    try:
        t_train = time.perf_counter()
        for chunk in data_lib.prefetch_to_device(
            _host_chunks(exp, seeds, start_step, shared), 2, chunk_sharding
        ):
            n = chunk["label"].shape[0]
            t0 = time.perf_counter()
            if n == 1:
                states, metrics = train_step(states, h, jax.tree_util.tree_map(lambda a: a[0], chunk))
            else:
                states, metrics = train_chunk(states, h, chunk)
                metrics = jax.tree_util.tree_map(lambda a: a[-1], metrics)
            if first:
                jax.block_until_ready(states.step)
                timings["first_step"] = time.perf_counter() - t0
                first = False
            previous, step = step, step + n
            n_window += n * config.batch_size
            epoch, step_in_epoch = divmod(step, exp.steps_per_epoch)
            if _crossed(previous, step, config.log_every_steps):
                metrics = jax.device_get(metrics)
                check_finite(states)
                rate = n_window / max(time.perf_counter() - t_window, 1e-9)
                t_window, n_window = time.perf_counter(), 0
                for k in range(K):
                    if active[k]:
                        writers[k].write("train", step, {**{m: v[k] for m, v in metrics.items()},
                                                         "images_per_sec": rate})
            if step_in_epoch and _crossed(previous, step, config.checkpoint.every_steps):
                check_finite(states)
                save_latest(states, step)
            if step_in_epoch == 0:
                timings["train"] += time.perf_counter() - t_train
                check_finite(states)
                records = _end_of_epoch(exp, states, epoch, step, veval, writers, ckpts, active,
                                        timings, tag, unstack)
                states = reset_sums(states)
                if epoch % config.checkpoint.every_epochs == 0 or step == total_steps:
                    save_latest(states, step)
                for k in range(K):
                    if not active[k]:
                        continue
                    outcomes[k].metrics = records[k]
                    if on_epoch_end is not None:
                        try:
                            on_epoch_end(k, epoch, records[k])
                        except StopTraining:
                            t0 = time.perf_counter()
                            ckpts[k].save_latest(step, unstack(states)[k])
                            timings["save"] += time.perf_counter() - t0
                            outcomes[k].pruned = True
                            active[k] = False
                t_train = time.perf_counter()
                if not any(active):
                    break
            if previous < kill_at <= step:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        for w in writers:
            w.close()
    check_finite(states)
    t0 = time.perf_counter()
    for k in range(K):
        if outcomes[k].error is None:
            report_lib.write_reports(workdirs[k], exp.dataset.class_names)
        ckpts[k].close()
        outcomes[k].metrics = {m: v for m, v in outcomes[k].metrics.items() if m != "confusion"}
    timings["save"] += time.perf_counter() - t0
    timings["steps"] = timings.pop("train") - timings["first_step"]
    timings["total"] = time.perf_counter() - t_start
    return outcomes, timings


def _end_of_epoch(exp, states, epoch, step, veval, writers, ckpts, active, timings, tag,
                  unstack) -> list[dict]:
    """Per-trial epoch records (train sums, and every eval split when due), as the trainer's."""
    config = exp.config
    K = len(writers)
    sums = jax.device_get(states.epoch_sums)
    records = [train_record(epoch, _slice(sums, k)) for k in range(K)]
    if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
        t0 = time.perf_counter()
        tests = [None] * K
        for name, split in eval_splits(exp).items():
            totals = None
            batches = data_lib.iterate_epoch(split.images, split.labels, config.eval_batch_size,
                                             shuffle=False, drop_remainder=False)
            replicated = NamedSharding(exp.mesh, PartitionSpec())
            for batch in data_lib.prefetch_to_device(batches, 2, replicated):
                out = veval(states.params, states.batch_stats, batch)
                totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
            totals = jax.device_get(totals)
            for k in range(K):
                res = metrics_from_sums(_slice(totals, k))
                if name == "test":
                    tests[k] = res["confusion"]
                records[k].update({f"{name}/{m}": v for m, v in res.items() if m not in ("confusion", "count")})
        timings["eval"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        trials = unstack(states)
        for k in range(K):
            if not active[k]:
                continue
            writers[k].write("epoch", step, records[k])
            ckpts[k].save_best(step, trials[k], records[k])
            if tests[k] is not None:
                np.save(os.path.join(os.path.dirname(writers[k].path), "confusion_last.npy"), tests[k])
        timings["save"] += time.perf_counter() - t0
    for k in range(K):
        if active[k]:
            summary = "  ".join(f"{m}={v:.4f}" for m, v in records[k].items()
                                if m != "epoch" and isinstance(v, float))
            print(f"{tag(k)} epoch {epoch:3d}/{config.num_epochs}  {summary}", flush=True)
    return records


def train_trials(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    *,
    on_epoch_end: Callable[[int, int, dict[str, Any]], None] | None = None,
    tag: Callable[[int], str] | None = None,
    vmap_width: int | None = None,
) -> tuple[list[TrialOutcome], dict[str, float]]:
    """Trains K >= 1 trials (equal :func:`pack_key` when K > 1), trial ``k`` in ``workdirs[k]``;
    the one entry point for runs and sweeps. ``on_epoch_end(k, epoch, record)`` may raise
    :class:`~cnnlab.train.StopTraining` for trial ``k``. Returns each trial's outcome and timings."""
    if len(configs) == 1:
        from cnnlab.train.trainer import train_and_evaluate

        outcome = TrialOutcome(metrics={})

        def one(epoch: int, record: dict[str, Any]) -> None:
            outcome.metrics = {m: v for m, v in record.items() if m != "confusion"}
            if on_epoch_end is not None:
                try:
                    on_epoch_end(0, epoch, record)
                except StopTraining:
                    outcome.pruned = True
                    raise

        t0 = time.perf_counter()
        try:
            final = train_and_evaluate(configs[0], workdirs[0], on_epoch_end=one)
            if not outcome.pruned:
                outcome.metrics = final
        except NonFiniteLossError as e:
            outcome.error = e
        return [outcome], {"total": time.perf_counter() - t0}
    return train_packed(configs, workdirs, on_epoch_end=on_epoch_end, tag=tag, vmap_width=vmap_width)
