"""Search spaces declared next to ``get_config()``: grids and sampled ranges over config fields.

A sweep file holds ``get_config()`` (the base training config) and ``get_sweep()``, which
returns a :class:`Sweep`. Fields are named by their dotted config path, any field of
:func:`cnnlab.train.default_config` (``"optimizer.learning_rate"``, ``"model.name"``,
``"model.kwargs.widths"``, ``"data.augment.keras_affine.zoom_range"``...), so structural choices are swept
the same way as numbers. A group path with a dict value replaces the whole group
(``"model.kwargs": {...}``), for points that switch the model.

Grids are finite lists of points, built from dicts of value lists::

    sweep.product({"optimizer.learning_rate": [1e-3, 3e-4], "seed": [0, 1]})   # 4 points
    sweep.zip({"model.name": ["simple_cnn", "stridednet"], "num_epochs": [10, 20]})  # 2 points
    sweep.chain(sweep.point({}), sweep.product({...}), ...)  # one after the other
    sweep.product(sweep.chain(...), {"seed": [0, 1, 2]})      # nested freely

Sampled spaces map fields to distributions: :func:`uniform`, :func:`loguniform`,
:func:`integer` and :func:`choice`; ``sampler="random"`` draws every trial up front from
``seed`` (reproducible whatever the number of workers), ``sampler="tpe"`` asks Optuna's TPE
sampler as trials finish. :func:`validate_sweep` checks every value a sweep can produce
before anything trains.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from cnnlab import models
from cnnlab.schema import ConfigError, copy_config, flatten, keys_without_effect, one_of
from cnnlab.train.config import selection_metrics, train_schema, validate_config

Point = dict[str, Any]

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
MODES = ("max", "min")

# --- Grids ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
    """A finite, ordered list of points (``{dotted_field: value}``)."""

    points: tuple[Point, ...]

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)


GridLike = Grid | Mapping[str, Sequence[Any]]


def _value_list(key: str, values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise ValueError(
            f"Grid values for {key!r} must be a list of values (tuples are single values, e.g. "
            f"widths), got {values!r}."
        )
    if not values:
        raise ValueError(f"Grid values for {key!r} are an empty list.")
    return values


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
        raise ValueError(f"A swept field must be a dotted config path like 'optimizer.learning_rate', got {key!r}.")
    return key


def _as_grid(part: GridLike, combine: str) -> Grid:
    if isinstance(part, Grid):
        return part
    if not isinstance(part, Mapping):
        raise ValueError(f"A grid part must be a dict of value lists or a Grid, got {part!r}.")
    keys = [_check_key(k) for k in part]
    lists = [_value_list(k, part[k]) for k in keys]
    if combine == "zip":
        if len({len(v) for v in lists}) > 1:
            sizes = {k: len(v) for k, v in builtins.zip(keys, lists)}
            raise ValueError(f"zip() needs value lists of one length, got {sizes}.")
        rows = builtins.zip(*lists)
    else:
        rows = itertools.product(*lists)
    return Grid(tuple(dict(builtins.zip(keys, row)) for row in rows))


def _merge(points: Sequence[Point]) -> Point:
    out: Point = {}
    for p in points:
        for k, v in p.items():
            if k in out:
                raise ValueError(f"Field {k!r} is set twice in one grid point (in product/zip parts).")
            out[k] = v
    return out


def point(values: Mapping[str, Any]) -> Grid:
    """A grid of one point with the given field values (``point({})`` is the base config)."""
    return Grid((dict((_check_key(k), v) for k, v in values.items()),))


def product(*parts: GridLike) -> Grid:
    """Every combination of the parts' points; a dict part is the product of its value lists.

    >>> len(product({"optimizer.learning_rate": [1e-3, 1e-4]}, {"seed": [0, 1, 2]}))
    6
    """
    grids = [_as_grid(p, "product") for p in parts]
    return Grid(tuple(_merge(combo) for combo in itertools.product(*(g.points for g in grids))))


def zip(*parts: GridLike) -> Grid:  # noqa: A001 - `sweep.zip` reads as intended
    """Points taken side by side (all parts of one length); a dict part zips its value lists.

    >>> len(zip({"model.kwargs.kernel_size": [3, 5, 7], "model.kwargs.padding": ["same"] * 3}))
    3
    """
    grids = [_as_grid(p, "zip") for p in parts]
    if len({len(g) for g in grids}) > 1:
        raise ValueError(f"zip() needs parts of one length, got lengths {[len(g) for g in grids]}.")
    return Grid(tuple(_merge(row) for row in builtins.zip(*(g.points for g in grids))))


def chain(*parts: GridLike) -> Grid:
    """The parts' points one after another (one-factor-at-a-time studies around a baseline)."""
    return Grid(tuple(p for part in parts for p in _as_grid(part, "product").points))


# --- Distributions --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Uniform:
    low: float
    high: float
    step: float | None = None


@dataclasses.dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class Integer:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]


Distribution = Uniform | LogUniform | Integer | Choice


def uniform(low: float, high: float, *, step: float | None = None) -> Uniform:
    """Floats uniform in ``[low, high]`` (on a ``step`` lattice when given)."""
    return Uniform(float(low), float(high), None if step is None else float(step))


def loguniform(low: float, high: float) -> LogUniform:
    """Floats whose logarithm is uniform in ``[log(low), log(high)]`` (learning rates, L2)."""
    return LogUniform(float(low), float(high))


def integer(low: int, high: int, *, step: int = 1, log: bool = False) -> Integer:
    """Integers in ``[low, high]`` (inclusive), on a ``step`` lattice or log-uniform."""
    return Integer(int(low), int(high), int(step), bool(log))


def choice(values: Sequence[Any]) -> Choice:
    """One of ``values`` (any JSON-like values: names, tuples of widths, dicts of kwargs)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"choice() takes a list of values, got {values!r}.")
    return Choice(tuple(values))


def _check_distribution(key: str, dist: Any) -> None:
    if isinstance(dist, (Uniform, LogUniform, Integer)):
        lo, hi = dist.low, dist.high
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"Range for {key!r} needs finite low <= high, got [{lo}, {hi}].")
        if (isinstance(dist, LogUniform) or getattr(dist, "log", False)) and lo <= 0:
            raise ValueError(f"Log range for {key!r} needs low > 0, got {lo}.")
        step = getattr(dist, "step", None)
        if step is not None and step <= 0:
            raise ValueError(f"Step for {key!r} must be positive, got {step}.")
        if isinstance(dist, Integer) and dist.log and dist.step != 1:
            raise ValueError(f"integer({key!r}): log=True needs step=1.")
    elif isinstance(dist, Choice):
        if not dist.values:
            raise ValueError(f"choice() for {key!r} has no values.")
        labels = [label(v) for v in dist.values]
        if len(set(labels)) != len(labels):
            raise ValueError(f"choice() for {key!r} repeats a value: {list(dist.values)!r}.")
    else:
        raise ValueError(
            f"Search space value for {key!r} must be uniform(), loguniform(), integer() or "
            f"choice(), got {dist!r}. (Value lists belong in a grid: sweep.product({{...}}).)"
        )


# --- The sweep ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a sweep file's ``get_sweep()`` returns.

    Args:
        grid: a :class:`Grid` (``sampler="grid"``); each point is one trial.
        space: ``{field: distribution}`` for ``sampler="random"`` or ``"tpe"``.
        sampler: ``"grid"`` (default with ``grid``), ``"random"`` or ``"tpe"`` (default with
            ``space``).
        num_trials: trials to sample (random/tpe).
        metric: the objective, a metric the runs record (``"val/accuracy"``; ``val/<m>`` or
            ``test/<m>`` for ``m`` in ``config.metrics``, ``train/loss``, ``train/accuracy``),
            taken at the last evaluation of each trial. A ``test/`` metric needs ``select_on_test``.
        mode: ``"max"`` or ``"min"``.
        pruner: ``"none"``, ``"median"``, ``"successive_halving"`` or ``"hyperband"``, on the
            metric reported after every evaluation (epoch).
        pruner_kwargs: keyword arguments of the Optuna pruner.
        sampler_kwargs: keyword arguments of Optuna's ``TPESampler`` (``n_startup_trials``...).
        seed: seed of the samplers (random draws, TPE).
        pack: default number of shape-compatible trials trained together in one program
            (the ``--pack`` flag overrides it); 1 runs every trial alone.
        select_on_test: allow a ``test/`` target metric (model selection on the test set, with
            a warning: its numbers then overstate how the chosen config generalizes).
        folds: k-fold cross-validated ranking (0: off; else >= 2). Each trial trains ``folds``
            runs, run ``j`` validating on fold ``j`` of the training split (``data.folds``,
            ``data.fold``: equal-sized, stratified, disjoint) and training on the rest; the
            trial's value is the mean of the metric over its folds (reported per epoch once
            every fold has reached it). The folds pack like seeds: ``pack`` counts runs, so
            ``pack=folds`` trains a trial's folds in one program. A trial's runs are
            ``trials/<slot>/fold_<j>``.
    """

    grid: Grid | None = None
    space: Mapping[str, Distribution] | None = None
    sampler: str | None = None
    num_trials: int = 0
    metric: str = "val/accuracy"
    mode: str = "max"
    pruner: str = "none"
    pruner_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sampler_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    pack: int = 1
    select_on_test: bool = False
    folds: int = 0

    @property
    def kind(self) -> str:
        return self.sampler or ("grid" if self.grid is not None else "tpe")

    @property
    def num_slots(self) -> int:
        """How many trials the sweep runs."""
        return len(self.grid) if self.kind == "grid" else self.num_trials

    def fields(self) -> list[str]:
        """The swept fields, in declaration order."""
        if self.kind == "grid":
            seen = dict.fromkeys(k for p in self.grid for k in p)
            return sorted(seen, key=lambda k: k == "seed")  # seeds last: they are repeats
        return list(self.space)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (``sweep.json``; its hash identifies the study)."""
        out: dict[str, Any] = {
            "sampler": self.kind, "metric": self.metric, "mode": self.mode, "pruner": self.pruner,
            "pruner_kwargs": dict(self.pruner_kwargs), "sampler_kwargs": dict(self.sampler_kwargs),
            "seed": self.seed,
            "num_trials": self.num_slots, **({"select_on_test": True} if self.select_on_test else {}),
            **({"folds": self.folds} if self.folds else {}),
        }
        if self.kind == "grid":
            out["grid"] = [{k: jsonable(v) for k, v in p.items()} for p in self.grid]
        else:
            out["space"] = {k: {"type": type(d).__name__, **jsonable(dataclasses.asdict(d))}
                            for k, d in self.space.items()}
        return out


def jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, unknown objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def label(value: Any) -> bool | int | float | str | None:
    """How a value appears as an Optuna categorical choice: itself if it is a plain scalar,
    else its JSON text (``(32, 64, 128)`` -> ``"[32, 64, 128]"``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(jsonable(value), sort_keys=True)


# --- Applying points to a config ------------------------------------------------------------------


def _as_config_value(value: Any) -> Any:
    # JSON-like values as a config holds them: lists as tuples, dicts as ConfigDicts.
    if isinstance(value, Mapping):
        return ml_collections.ConfigDict({k: _as_config_value(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_as_config_value(v) for v in value)
    return value


def apply_point(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with each dotted field set. Keys and values are checked by
    :func:`cnnlab.train.validate_config` (an unknown key is named there, with the closest one)."""
    out = copy_config(config)
    for key, value in values.items():
        *parents, leaf = _check_key(key).split(".")
        node = out
        for i, name in enumerate(parents):
            if name not in node:
                node[name] = ml_collections.ConfigDict()
            if not isinstance(node[name], ml_collections.ConfigDict):
                raise ConfigError(f"config key {'.'.join(parents[:i + 1])!r} is not a group: cannot set {key!r}")
            node = node[name]
        value = _as_config_value(value)
        try:
            if leaf in node and isinstance(node[leaf], ml_collections.ConfigDict) != isinstance(
                value, ml_collections.ConfigDict
            ):
                raise TypeError("a group must be replaced by a dict (and a value by a value)")
            try:
                node[leaf] = value
            except TypeError:
                # ConfigDict keeps a field's type; a sweep may legitimately change it (e.g.
                # image_size 96 -> (96, 128)): replace the field (validate_config checks it).
                del node[leaf]
                node[leaf] = value
        except (TypeError, KeyError) as e:
            raise ValueError(f"Cannot set {key!r} to {value!r}: {e}") from None
    return out


def get_field(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
    node: Any = config
    for name in key.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or name not in node:
            return default
        node = node[name]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def fingerprint(base: ml_collections.ConfigDict, sweep: Sweep) -> str:
    """A hash of the base config and the sweep: a study only resumes the sweep it was made by."""
    without_effect = set(keys_without_effect(train_schema()))
    plain = {k: v for k, v in flatten(base).items() if k not in without_effect}
    text = json.dumps({"base": jsonable(plain), "sweep": sweep.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- Validation -----------------------------------------------------------------------------------


def _validate_values(base: ml_collections.ConfigDict, values: Mapping[str, Any], where: str) -> None:
    try:
        validate_config(apply_point(base, values))
    except ValueError as e:
        raise ValueError(f"Sweep {where} {dict(values)!r} is invalid: {e}") from None


def _check_shape(sweep: Sweep) -> None:
    """A grid sweep has a non-empty grid and no space; a sampled one a non-empty space, no grid
    and a positive trial count (so :meth:`Sweep.fields` can be read)."""
    if sweep.kind == "grid":
        if sweep.grid is None or sweep.space:
            raise ValueError("sampler='grid' takes grid=... (and no space).")
        if not isinstance(sweep.grid, Grid) or not len(sweep.grid):
            raise ValueError(f"grid must be a non-empty Grid (sweep.product/zip/chain/point), got {sweep.grid!r}.")
        return
    if sweep.grid is not None:
        raise ValueError(f"sampler={sweep.kind!r} takes space=... (no grid); grids use sampler='grid'.")
    if not isinstance(sweep.space, Mapping) or not sweep.space:
        raise ValueError(f"sampler={sweep.kind!r} needs a non-empty space={{field: distribution}}.")
    if not isinstance(sweep.num_trials, int) or sweep.num_trials < 1:
        raise ValueError(f"num_trials must be a positive integer for sampler={sweep.kind!r}, got {sweep.num_trials!r}.")


def validate_sweep(sweep: Sweep, base: ml_collections.ConfigDict) -> Sweep:
    """Checks the sweep, and every grid point, range bound and choice applied to ``base`` with
    :func:`cnnlab.train.validate_config`; returns the sweep or raises ``ValueError`` naming the
    field, the value and the point."""
    if not isinstance(sweep, Sweep):
        raise ValueError(f"get_sweep() must return a cnnlab.sweep.Sweep, got {type(sweep).__name__}.")
    if sweep.kind not in SAMPLERS:
        raise ValueError(f"Invalid Sweep(sampler={sweep.sampler!r}): {one_of(sweep.sampler, list(SAMPLERS))}")
    config = validate_config(base)
    metrics = selection_metrics(config)
    if sweep.metric not in metrics:
        raise ValueError(f"Invalid Sweep(metric={sweep.metric!r}): {one_of(sweep.metric, list(metrics))}")
    if sweep.metric.startswith("test/"):
        if not sweep.select_on_test:
            raise ValueError(
                f"metric={sweep.metric!r} selects trials on the test set: use metric="
                f"{'val/' + sweep.metric[5:]!r} (with data.val_fraction > 0), or Sweep(..., "
                "select_on_test=True) to select on the test set deliberately."
            )
        warnings.warn(f"Sweep metric={sweep.metric!r} (select_on_test=True): the test set is used "
                      "for model selection, so test numbers overstate the chosen config.", stacklevel=2)
    if not isinstance(sweep.folds, int) or isinstance(sweep.folds, bool) or sweep.folds == 1 or sweep.folds < 0:
        raise ValueError(f"Invalid Sweep(folds={sweep.folds!r}): must be 0 (off) or an integer >= 2.")
    if sweep.folds and config.data.folds:
        raise ValueError(f"Sweep(folds={sweep.folds}) sets data.folds and data.fold itself; the base "
                         f"config sets data.folds={config.data.folds}: remove it.")
    if sweep.metric.startswith("val/") and not (config.data.val_fraction or sweep.folds or config.data.folds):
        raise ValueError(f"metric={sweep.metric!r} needs a validation split: set data.val_fraction > 0 "
                         "(or Sweep(folds=k)).")
    if sweep.mode not in MODES:
        raise ValueError(f"Invalid Sweep(mode={sweep.mode!r}): {one_of(sweep.mode, list(MODES))}")
    if sweep.pruner not in PRUNERS:
        raise ValueError(f"Invalid Sweep(pruner={sweep.pruner!r}): {one_of(sweep.pruner, list(PRUNERS))}")
    if not isinstance(sweep.pack, int) or sweep.pack < 1:
        raise ValueError(f"pack must be an integer >= 1, got {sweep.pack!r}.")
    _check_shape(sweep)
    if sweep.folds and {"data.folds", "data.fold"} & set(sweep.fields()):
        raise ValueError(f"Sweep(folds={sweep.folds}) sets data.folds and data.fold itself; do not "
                         "sweep them too.")
    if sweep.kind == "grid":
        for i in range(len(sweep.grid)):
            _validate_values(base, grid_values(sweep, base, i), f"grid point {i}")
        return sweep
    for key, dist in sweep.space.items():
        _check_key(key)
        _check_distribution(key, dist)
        for v in dist.values if isinstance(dist, Choice) else (dist.low, dist.high):
            _validate_values(base, {key: v}, f"value for {key!r}:")
    return sweep


# --- Values of a trial ----------------------------------------------------------------------------


_UNSET = object()


def base_values(sweep: Sweep, base: ml_collections.ConfigDict) -> dict[str, Any]:
    """What ``base`` gives each swept field, as a grid point that leaves it alone is labelled:
    its own value, else the default it resolves to (a model keyword the base does not set: the
    model's field default), else None."""
    out: dict[str, Any] = {}
    resolved = None
    for key in sweep.fields():
        value = get_field(base, key, _UNSET)
        if value is _UNSET:
            resolved = validate_config(base) if resolved is None else resolved
            value = get_field(resolved, key, _UNSET)
        if value is _UNSET and key.startswith("model.kwargs."):
            field = models.model_schema(resolved.model.name).get(key[len("model.kwargs."):])
            value = field.default if field is not None else _UNSET
        out[key] = None if value is _UNSET else value
    return out


def grid_values(sweep: Sweep, base: ml_collections.ConfigDict, index: int) -> dict[str, Any]:
    """The swept fields' values of grid point ``index``'s trial: the point's own, and the base
    config's own value of each other swept field it sets. A field neither sets is left out: the
    trial leaves it alone (a model keyword then takes that model's default, where it has one)."""
    point = sweep.grid.points[index]
    out = {k: get_field(base, k, _UNSET) for k in sweep.fields() if k not in point}
    return {**{k: v for k, v in out.items() if v is not _UNSET}, **point}


def grid_params(sweep: Sweep, base: ml_collections.ConfigDict, index: int,
                defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Optuna params (labels) of grid point ``index``, one per swept field (a field the
    trial leaves alone is labelled by :func:`base_values`)."""
    defaults = base_values(sweep, base) if defaults is None else defaults
    values = grid_values(sweep, base, index)
    return {k: label(values.get(k, defaults[k])) for k in sweep.fields()}


def grid_choices(sweep: Sweep, base: ml_collections.ConfigDict) -> dict[str, list[Any]]:
    """``{field: [label, ...]}``: every label a field takes over the grid's points."""
    defaults = base_values(sweep, base)
    out: dict[str, list[Any]] = {k: [] for k in sweep.fields()}
    for i in range(len(sweep.grid)):
        for key, value in grid_params(sweep, base, i, defaults).items():
            if value not in out[key]:
                out[key].append(value)
    return out


def sample_random(sweep: Sweep, index: int) -> dict[str, Any]:
    """Trial ``index``'s draw of a random sweep (Optuna params), a function of ``(seed, index)``
    alone, so any number of workers draws the same sweep."""
    rng = np.random.default_rng([sweep.seed, index])
    out: dict[str, Any] = {}
    for key, d in sweep.space.items():
        if isinstance(d, Choice):
            out[key] = label(d.values[int(rng.integers(len(d.values)))])
        elif isinstance(d, LogUniform):
            out[key] = float(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
        elif isinstance(d, Uniform):
            v = float(rng.uniform(d.low, d.high))
            if d.step:
                v = min(d.low + round((v - d.low) / d.step) * d.step, d.high)
            out[key] = v
        else:
            if d.log:
                v = int(round(math.exp(rng.uniform(math.log(d.low), math.log(d.high + 1) - 1e-12) - 0.5)))
                v = min(max(v, d.low), d.high)
            else:
                n = (d.high - d.low) // d.step + 1
                v = d.low + int(rng.integers(n)) * d.step
            out[key] = int(v)
    return out


def suggest(trial: Any, sweep: Sweep, base: ml_collections.ConfigDict, slot: int) -> dict[str, Any]:
    """Asks ``trial`` (an ``optuna.Trial`` for ``slot``) for each swept field; returns
    ``{field: value}`` to apply to ``base``. Fixed (enqueued) params come back as they were
    enqueued; TPE samples the others. A grid trial's values are its point's
    (:func:`grid_values`), its params registered with Optuna."""
    values: dict[str, Any] = {}
    if sweep.kind == "grid":
        for key, labels in grid_choices(sweep, base).items():
            trial.suggest_categorical(key, labels)
        return grid_values(sweep, base, slot)
    for key, d in sweep.space.items():
        if isinstance(d, Choice):
            by_label = {label(v): v for v in d.values}
            values[key] = by_label[trial.suggest_categorical(key, list(by_label))]
        elif isinstance(d, LogUniform):
            values[key] = trial.suggest_float(key, d.low, d.high, log=True)
        elif isinstance(d, Uniform):
            values[key] = trial.suggest_float(key, d.low, d.high, step=d.step)
        else:
            values[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
    return values
