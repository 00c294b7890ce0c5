"""The training config schema: every field with its default, and validation before any compute.

A config file's ``get_config()`` starts from :func:`default_config` and overrides fields. Before
a run, :func:`validate_config` checks it against this schema: unknown keys (with the closest
valid key for typos), wrong types, unknown names (model, optimizer, schedule) and impossible
combinations are rejected with the key named.

Fields (``config.<field>``):

* ``seed``: PRNG seed for initialization, dropout, augmentation and data order.
* ``num_epochs``, ``batch_size`` (global, over all devices and processes),
  ``per_device_batch_size`` (0 = unused; when set, the global ``batch_size`` becomes it times
  the device count, and the resolved value is what ``config.json`` records), ``grad_accum_steps``
  (``optax.MultiSteps``: one update per this many batches), ``steps_per_dispatch`` (batches run
  per jitted call through ``lax.scan``, like Keras' ``steps_per_execution``; unrolled on CPU,
  so keep it small there),
  ``eval_batch_size``.
* ``model.name`` (a :mod:`cnnlab.models` name) and ``model.kwargs`` (its arguments).
* ``data``: see :mod:`cnnlab.data` (source, classes, split, image size, augmentation...).
* ``optimizer``: ``name`` in adam/adamw/sgd/rmsprop, ``learning_rate``, ``b1``, ``b2``, ``eps``,
  ``momentum``, ``nesterov``, ``rho``, ``weight_decay`` (decoupled, adamw/sgd), ``grad_clip_norm``.
* ``schedule``: ``name`` in constant/keras_decay/cosine/step; ``decay`` (Keras' legacy
  ``lr / (1 + decay * step)``), ``warmup_epochs``, ``min_lr_ratio``, ``step_epochs``,
  ``step_factor``.
* ``loss.label_smoothing``.
* ``normalization``: ``scale`` (``x / 255``, the tutorial's) or ``mean_std`` (per-channel
  statistics of the training images).
* ``mixed_precision``: compute in bfloat16 with float32 parameters.
* ``checkpoint``: ``every_epochs``, ``every_steps`` (0 = only at epoch ends), ``keep``,
  ``best_metric`` (e.g. ``"test/accuracy"``), ``best_mode`` (max/min).
* ``log_every_steps``, ``eval_every_epochs``, ``progress`` (show a progress bar).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from cnnlab import models
from cnnlab.data import default_data_config, resolve_config

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "keras_decay", "cosine", "step")
METRICS = (
    "test/accuracy",
    "test/loss",
    "test/mean_per_class_accuracy",
    "test/top5_accuracy",
    "val/accuracy",
    "val/loss",
    "val/mean_per_class_accuracy",
    "val/top5_accuracy",
)


def default_config() -> ml_collections.ConfigDict:
    """Every training field with its default value."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_epochs = 10
    c.batch_size = 32
    c.per_device_batch_size = 0
    c.grad_accum_steps = 1
    c.steps_per_dispatch = 1
    c.eval_batch_size = 128

    c.model = ml_collections.ConfigDict()
    c.model.name = "stridednet"
    c.model.kwargs = ml_collections.ConfigDict()

    c.data = default_data_config()

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-7  # Keras' default epsilon
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.rho = 0.9
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 0.0

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "constant"
    c.schedule.decay = 0.0
    c.schedule.warmup_epochs = 0.0
    c.schedule.min_lr_ratio = 0.0
    c.schedule.step_epochs = 30
    c.schedule.step_factor = 0.1

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0

    c.normalization = "scale"
    c.mixed_precision = False

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 2
    c.checkpoint.best_metric = "test/accuracy"
    c.checkpoint.best_mode = "max"

    c.log_every_steps = 20
    c.eval_every_epochs = 1
    c.progress = True
    return c


def _closest(key: str, choices) -> str:
    match = difflib.get_close_matches(key, list(choices), n=1)
    return f' Did you mean "{match[0]}"?' if match else ""


def _check_against_schema(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ValueError(
                f"Unknown config key {path!r}.{_closest(key, schema.keys())} Valid keys here: "
                f"{sorted(schema.keys())}."
            )
        expected = schema[key]
        if path in ("model.kwargs",):
            continue  # checked against the chosen model's arguments
        if isinstance(expected, Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"Config key {path!r} must be a group of fields, got {value!r}.")
            _check_against_schema(value, expected, path + ".")
        elif expected is not None and value is not None:
            if isinstance(expected, bool) != isinstance(value, bool):
                raise ValueError(f"Config key {path!r} must be a bool, got {value!r}.")
            if isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool):
                continue
            if isinstance(expected, (int, float, str)) and not isinstance(value, type(expected)):
                raise ValueError(
                    f"Config key {path!r} must be of type {type(expected).__name__}, got {value!r}."
                )


def _choice(path: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"Invalid {path}={value!r}.{_closest(str(value), choices)} Valid values: {sorted(choices)}."
        )


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks ``config`` against the schema; returns it (unchanged) or raises ``ValueError``."""
    plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    schema = default_config().to_dict()
    _check_against_schema(plain, schema, "")
    merged = default_config()
    merged.update(config)

    for key in ("num_epochs", "batch_size", "eval_batch_size", "log_every_steps", "eval_every_epochs",
                "grad_accum_steps", "steps_per_dispatch"):
        if merged[key] <= 0:
            raise ValueError(f"Config key {key!r} must be positive, got {merged[key]!r}.")
    if merged.per_device_batch_size < 0:
        raise ValueError(
            f"Config key 'per_device_batch_size' must be >= 0, got {merged.per_device_batch_size!r}."
        )
    _choice("model.name", merged.model.name, models.MODELS)
    fields = models.model_fields(merged.model.name)
    for key in merged.model.kwargs.keys():
        if key == "num_classes":
            raise ValueError("model.kwargs.num_classes is set from the data; remove it.")
        if key not in fields:
            raise ValueError(
                f"Unknown config key 'model.kwargs.{key}' for model {merged.model.name!r}."
                f"{_closest(key, fields)} Its arguments: {sorted(fields - {'num_classes'})}."
            )
    _choice("optimizer.name", merged.optimizer.name, OPTIMIZERS)
    _choice("normalization", merged.normalization, ("scale", "mean_std"))
    _choice("schedule.name", merged.schedule.name, SCHEDULES)
    if merged.optimizer.learning_rate <= 0:
        raise ValueError(f"optimizer.learning_rate must be positive, got {merged.optimizer.learning_rate!r}.")
    if not 0.0 <= merged.loss.label_smoothing < 1.0:
        raise ValueError(f"loss.label_smoothing must be in [0, 1), got {merged.loss.label_smoothing!r}.")
    if merged.schedule.name == "keras_decay" and merged.schedule.decay < 0:
        raise ValueError(f"schedule.decay must be >= 0, got {merged.schedule.decay!r}.")
    if merged.schedule.warmup_epochs < 0 or merged.schedule.warmup_epochs > merged.num_epochs:
        raise ValueError(
            f"schedule.warmup_epochs={merged.schedule.warmup_epochs!r} must be in [0, num_epochs="
            f"{merged.num_epochs}]."
        )
    resolve_config(merged.data)  # raises ValueError naming a bad data.* field
    _choice("checkpoint.best_metric", merged.checkpoint.best_metric, METRICS)
    _choice("checkpoint.best_mode", merged.checkpoint.best_mode, ("max", "min"))
    if merged.checkpoint.best_metric.startswith("val/") and merged.data.val_fraction <= 0:
        raise ValueError(
            f"checkpoint.best_metric={merged.checkpoint.best_metric!r} needs a validation split: "
            "set data.val_fraction > 0."
        )
    if merged.checkpoint.keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {merged.checkpoint.keep!r}.")
    if merged.checkpoint.every_epochs < 1 or merged.checkpoint.every_steps < 0:
        raise ValueError("checkpoint.every_epochs must be >= 1 and checkpoint.every_steps >= 0.")
    return merged
