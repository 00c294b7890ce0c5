"""Fine-tuning: a fresh run's weights from another model (``config.init_from``), checks of the
parameter patterns (``config.freeze``, ``optimizer.lr_multipliers``), and the moving statistics
of frozen normalization layers (``config.freeze_batch_stats``).

What the optimizer does with frozen and scaled parameters is the optimizer's
(:func:`cnnlab.train.optim.update_factor`). Loading happens when a run starts (step 0) only: a
resume restores its own checkpoint. Variables are matched

* by path (``params/Conv2D_0/kernel``) for a cnnlab run directory (its ``best`` or ``latest``
  checkpoint, ``config.init_from_which``);
* by layer order for a Keras file: the model's layers that hold variables, in the order the
  model calls them, are paired with the Keras model's (:func:`cnnlab.interop.from_keras`), then
  their variables by name (Keras' names: ``kernel``, ``gamma``, ``moving_mean``...).

Either way a variable is loaded when its shape matches; the others (a head for another number
of classes, layers the source lacks) keep their fresh initialization. The run's
``init_from.json`` lists what was loaded and what was not, and why.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnlab.schema import ConfigError
from cnnlab.train import optim
from cnnlab.train.experiment import Experiment, load_trained, replicated

Key = tuple[str, ...]  # (collection, *module path, variable name)


@dataclasses.dataclass
class Source:
    """The variables ``config.init_from`` names: ``variables`` (``{"params", "batch_stats"}``),
    ``record`` (what it is: ``init_from``, ``kind``, and for a run ``which`` and ``step``) and,
    for a Keras file, ``order``: its module paths in call order (matching by layer order)."""

    variables: dict[str, Any]
    record: dict[str, Any]
    order: list[tuple[str, ...]] | None = None


# ---------------------------------------------------------------------------------------------
# Checks (before a run writes anything)
# ---------------------------------------------------------------------------------------------


def variable_shapes(exp: Experiment) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the experiment's model as ``ShapeDtypeStruct``\\ s."""
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda: exp.model.init({"params": key, "dropout": key},
                                                   jnp.zeros((1, *exp.image_shape), jnp.float32),
                                                   training=False))
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def param_paths(params: Any) -> list[str]:
    """The ``"/"``-joined paths of a parameter tree's leaves (what ``freeze`` matches)."""
    return [optim.path_name(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def check(exp: Experiment, *, fresh: bool) -> Source | None:
    """Refuses a ``freeze`` or ``optimizer.lr_multipliers`` regex that matches no parameter of
    the model, and an ``init_from`` that cannot be read; returns the loaded source when the
    config has one and a run starts ``fresh`` (else ``None``).

    Raises:
      ConfigError: naming the key, the value and (for a pattern) the model's parameter paths.
    """
    config = exp.config
    paths = param_paths(variable_shapes(exp)["params"])
    patterns = [("freeze", p) for p in config.freeze]
    patterns += [("optimizer.lr_multipliers", r) for r, _ in config.optimizer.lr_multipliers]
    for key, pattern in patterns:
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise ConfigError(
                f"config key {key!r}: {pattern!r} matches no parameter path of model "
                f"{config.model.name!r} (a regex matches a whole path; the paths: {', '.join(paths)})")
    if not config.init_from or not fresh:
        return None
    return load_source(exp)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # as cnnlab.interop: Keras reads it on import
    try:
        import keras
    except ImportError:
        raise ConfigError("config key 'init_from': a Keras file needs Keras 3: "
                          'pip install "cnnlab[keras]"') from None
    return keras


def load_source(exp: Experiment) -> Source:
    """The variables of ``config.init_from``: a run directory (``load_trained``), a ``.keras``
    file (``interop.from_keras``; of a ``cnnlab export`` file, the network inside it) or a ``.weights.h5`` file, which holds weights only and so is
    read into the config's own model exported to Keras (``interop.to_keras``; the same
    architecture, the number of classes included, is required).

    Raises:
      ConfigError: a path that does not exist or is none of these, or a source that fails to load.
    """
    config = exp.config
    path = os.path.expanduser(config.init_from)
    record: dict[str, Any] = {"init_from": config.init_from}
    if os.path.isdir(path):
        try:
            trained = load_trained(path, which=config.init_from_which)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"config key 'init_from': {err}") from None
        record.update(kind="run", which=trained.which, step=int(trained.step),
                      model=trained.config.model.name)
        return Source(jax.device_get(trained.variables), record)
    if not os.path.exists(path):
        raise ConfigError(f"config key 'init_from': {config.init_from!r} does not exist (a cnnlab run "
                          "directory, a .keras or a .weights.h5 file)")
    if not path.endswith((".keras", ".weights.h5")):
        raise ConfigError(f"config key 'init_from': {config.init_from!r} is neither a run directory "
                          "nor a .keras or .weights.h5 file")
    keras = _keras()
    from cnnlab import interop

    try:
        if path.endswith(".keras"):
            # a cnnlab export: its network alone, since the run normalizes its own inputs
            keras_model = interop.trained_network(keras.saving.load_model(path, compile=False))
            record["kind"] = "keras"
        else:
            fresh = jax.device_get(variable_shapes(exp))
            fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), fresh)
            keras_model = interop.to_keras(exp.model, fresh, exp.image_shape)
            keras_model.load_weights(path)
            record["kind"] = "keras_weights"
        module, variables = interop.from_keras(keras_model)
    except (interop.InteropError, ValueError, OSError) as err:
        raise ConfigError(f"config key 'init_from': cannot load {config.init_from!r}: {err}") from None
    variables = jax.device_get(variables)
    return Source(variables, record, order=layer_order(module, variables, exp.image_shape))


def layer_order(module: flax_nn.Module, variables: Mapping[str, Any],
                image_shape: tuple[int, ...]) -> list[tuple[str, ...]]:
    """The paths of ``module``'s submodules in the order a forward pass calls them (traced on
    zeros, nothing computed)."""
    order: list[tuple[str, ...]] = []

    def interceptor(next_fun, args, kwargs, context):
        scope = context.module.scope
        if context.method_name == "__call__" and scope is not None:
            path = tuple(scope.path)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, *image_shape), jnp.float32)
    with flax_nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v: module.apply(v, x, training=False), dict(variables))
    return order


# ---------------------------------------------------------------------------------------------
# Matching and merging
# ---------------------------------------------------------------------------------------------


def _flat(variables: Mapping[str, Any]) -> dict[Key, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(
        {c: variables.get(c, {}) for c in ("params", "batch_stats")})[0]
    return {tuple(str(k.key) for k in kp): leaf for kp, leaf in leaves}


def _name(key: Key) -> str:
    return "/".join(key)


def _layers(flat: Mapping[Key, Any], order: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The module paths that hold variables, in call order (any not called, after)."""
    held = {k[1:-1] for k in flat}
    return [p for p in order if p in held] + sorted(held - set(order))


def plan(source: Source, fresh: Mapping[str, Any], target_order: list[tuple[str, ...]] | None = None
         ) -> tuple[dict[Key, Key], dict[str, Any]]:
    """``({target key: source key} to load, record)`` for a model whose fresh variables (or
    their shapes) are ``fresh``. ``record``: the source's, ``matched_by``, ``loaded``,
    ``reinitialized`` (``{variable: why}``) and ``unused`` (source variables not loaded)."""
    target, src = _flat(fresh), _flat(source.variables)
    pairs: dict[Key, Key] = {}
    if source.order is None:
        candidates = {k: k for k in target if k in src}
        missing = "not in the source"
    else:
        layers = dict(zip(_layers(target, target_order or []), _layers(src, source.order)))
        candidates = {k: (k[0], *layers[k[1:-1]], k[-1]) for k in target if k[1:-1] in layers}
        candidates = {k: s for k, s in candidates.items() if s in src}
        missing = "no such variable in the source layer of the same position"
    why: dict[str, str] = {}
    for key in target:
        if key not in candidates:
            why[_name(key)] = missing
            continue
        here, there = tuple(np.shape(target[key])), tuple(np.shape(src[candidates[key]]))
        if here != there:
            why[_name(key)] = f"shape {list(here)} here, {list(there)} in the source"
        else:
            pairs[key] = candidates[key]
    record = {**source.record, "matched_by": "path" if source.order is None else "layer order",
              "loaded": {_name(k): _name(s) for k, s in pairs.items()},
              "reinitialized": why,
              "unused": sorted(_name(k) for k in set(src) - set(pairs.values()))}
    return pairs, record


def merge(variables: Mapping[str, Any], source: Source, pairs: Mapping[Key, Key]) -> dict[str, Any]:
    """``variables`` (``{"params", "batch_stats"}``) with the source's arrays in place of the
    planned ones (in their dtype)."""
    src = _flat(source.variables)

    def pick(kp, leaf):
        key = tuple(str(k.key) for k in kp)
        return jnp.asarray(src[pairs[key]], leaf.dtype) if key in pairs else leaf

    return jax.tree_util.tree_map_with_path(
        pick, {c: variables.get(c, {}) for c in ("params", "batch_stats")})


def initialize(exp: Experiment, prog: Any, states: Any, source: Source) -> tuple[Any, dict[str, Any]]:
    """The fresh ``states`` of a program (:func:`cnnlab.train.packing.build_program`) with the
    source's variables loaded into each trial (each keeps its own fresh values elsewhere) and
    its optimizer state initialized anew from them; returns ``(states, record)``."""
    trials = prog.trials(states)
    order = layer_order(exp.model, variable_shapes(exp), exp.image_shape) if source.order is not None else None
    pairs, record = plan(source, {"params": trials[0].params, "batch_stats": trials[0].batch_stats}, order)
    init_opt = jax.jit(exp.tx.init)
    out = []
    for state in trials:
        merged = jax.device_put(merge({"params": state.params, "batch_stats": state.batch_stats},
                                      source, pairs), replicated(exp.mesh))
        out.append(state.replace(params=merged["params"], batch_stats=merged["batch_stats"],
                                 opt_state=init_opt(merged["params"])))
    return prog.stack(out), record


def summary(record: Mapping[str, Any]) -> str:
    """One line: where the weights came from, how many loaded, which kept fresh."""
    loaded, fresh = record["loaded"], record["reinitialized"]
    where = record["init_from"]
    if record.get("kind") == "run":
        where += f" ({record['which']} checkpoint, step {record['step']})"
    line = f"init_from {where}: loaded {len(loaded)} of {len(loaded) + len(fresh)} variables (by {record['matched_by']})"
    if fresh:
        shown = list(fresh)[:4]
        more = f", ... {len(fresh) - 4} more" if len(fresh) > 4 else ""
        line += f"; kept fresh: {', '.join(shown)}{more}"
    if record["unused"]:
        line += f"; {len(record['unused'])} source variable(s) unused"
    return line + "."


# ---------------------------------------------------------------------------------------------
# Frozen normalization layers' statistics
# ---------------------------------------------------------------------------------------------


def kept_stats_layers(config: Any, shapes: Mapping[str, Any]) -> set[tuple[str, ...]]:
    """With ``config.freeze_batch_stats``: the module paths holding batch statistics whose
    parameters are all frozen (:func:`cnnlab.train.optim.update_factor` is 0 for each of them);
    a layer without parameters counts when its statistics' paths match a ``freeze`` regex."""
    factor = optim.update_factor(config)
    if not config.get("freeze_batch_stats", False) or factor is None:
        return set()
    flat = _flat(shapes)
    layers: dict[tuple[str, ...], list[bool]] = {}
    for key in flat:
        if key[0] == "batch_stats":
            layers.setdefault(key[1:-1], [])
    for key in flat:
        if key[0] == "params" and key[1:-1] in layers:
            layers[key[1:-1]].append(factor(_name(key[1:])) == 0)
    freeze = [re.compile(p) for p in config.freeze]
    kept = set()
    for layer, frozen in layers.items():
        stats = [_name(k[1:]) for k in flat if k[0] == "batch_stats" and k[1:-1] == layer]
        if (frozen and all(frozen)) or (not frozen and all(any(p.fullmatch(s) for p in freeze)
                                                           for s in stats)):
            kept.add(layer)
    return kept


def keep_stats(new: Any, old: Any, layers: set[tuple[str, ...]]) -> Any:
    """``new`` batch statistics with ``old`` ones for the modules at ``layers``."""
    def pick(kp, a, b):
        return b if tuple(str(k.key) for k in kp)[:-1] in layers else a

    return jax.tree_util.tree_map_with_path(pick, new, old)
