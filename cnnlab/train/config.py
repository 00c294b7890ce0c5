"""The training config: every field declared once in :func:`train_schema` (default, type, check,
one-line doc), from which come :func:`default_config`, :func:`validate_config` and
:func:`config_help` (what ``cnnlab train --help`` prints).

A config file's ``get_config()`` starts from :func:`default_config` and overrides fields.
:func:`validate_config` rejects unknown keys (naming the closest valid one), wrong types, names
not in their registry (model, optimizer, schedule, metric, augmentation op) and impossible
combinations, before any compute, as a :class:`cnnlab.schema.ConfigError`.
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_collections

from cnnlab import models
from cnnlab.data.config import data_schema
from cnnlab.native import conv_impl
from cnnlab.schema import (
    ConfigError,
    Field,
    Schema,
    at_least,
    field_docs,
    in_range,
    invalid,
    one_of,
    resolve,
    unknown,
)
from cnnlab.schema import default_config as schema_defaults
from cnnlab.train import losses, optim, steps
from cnnlab.train import metrics as metrics_lib

#: The train-split metrics a checkpoint may also be selected on.
TRAIN_METRICS = ("train/loss", "train/accuracy")


def _positive_int(default: int, doc: str) -> Field:
    return Field(default, int, at_least(1), doc)


_PRECISION_WORDS = {"auto": "auto", "true": True, "false": False, "bfloat16": True, "float32": False}


def _formulation_check(value: str) -> str | None:
    return conv_impl.check_setting(value)


def _precision_check(value: Any) -> str | None:
    if isinstance(value, bool) or str(value).strip().lower() in _PRECISION_WORDS:
        return None
    return "must be True, False or 'auto'"


def _precision(value: Any) -> bool | str:
    """True, False or ``"auto"`` (also from the words true/false/bfloat16/float32)."""
    return value if isinstance(value, bool) else _PRECISION_WORDS[str(value).strip().lower()]


def _freeze_check(value: tuple) -> str | None:
    for pattern in value:
        if not isinstance(pattern, str):
            return f"each item must be a regex string, not {pattern!r}"
        problem = optim.regex_problem(pattern)
        if problem:
            return problem
    return None


def train_schema() -> Schema:
    """Every training field (``data`` included), built from the registries as they are now."""
    return {
        "seed": Field(0, int, at_least(0), "PRNG seed: initialization, dropout, augmentation, data order"),
        "num_epochs": _positive_int(10, "training epochs"),
        "batch_size": _positive_int(32, "global batch size, over all devices and processes"),
        "per_device_batch_size": Field(0, int, at_least(0), "if > 0, batch_size = this x devices"),
        "grad_accum_steps": _positive_int(1, "optax.MultiSteps: one update per this many batches"),
        "steps_per_dispatch": _positive_int(1, "batches per jitted call (lax.scan; unrolled on CPU)"),
        "eval_batch_size": _positive_int(128, "evaluation batch size"),
        "eval_flip": Field(False, bool, doc="test-time augmentation: evaluation, predictions and "
                           "exports average the logits of each image and its left-right mirror"),
        "eval_views": Field("single", str, choices=("single", "crops5", "scales3"),
                            doc="test-time views whose logits evaluation and predictions average: the "
                            "image; 4 corner and 1 centre crops of 87.5%; or centre crops of 100/90/80% "
                            "(times 2 with eval_flip); exports support single only"),
        "metrics": Field(metrics_lib.DEFAULT_METRICS, tuple, choices=metrics_lib.metric_names,
                         doc="evaluation metrics (cnnlab.train.metrics registry)"),
        "model": {
            "name": Field("stridednet", str, choices=lambda: models.MODELS, doc="registered model"),
            "kwargs": Field({}, dict, doc="the model's constructor arguments (num_classes comes from the data)"),
        },
        "data": data_schema(),
        "optimizer": optim.optimizer_schema(),
        "schedule": optim.schedule_schema(),
        "loss": losses.loss_schema(),
        # Fine-tuning (cnnlab.train.finetune): where the weights start, and which stay fixed.
        "init_from": Field("", str,
                           doc="start from another model's weights: a cnnlab run directory (its "
                           "init_from_which checkpoint), a .keras file or a .weights.h5 file (for "
                           "the config's own model); variables whose path and shape match are "
                           "loaded, the others (e.g. a head for other classes) keep their fresh "
                           "initialization and are listed in init_from.json; a resume restores "
                           "its checkpoint instead; empty: off"),
        "init_from_which": Field("best", str, choices=("best", "latest"),
                                 doc="the checkpoint of an init_from run directory (best falls "
                                 "back to latest when the run has none)"),
        "freeze": Field((), tuple, _freeze_check,
                        doc="regexes over '/'-joined parameter paths (e.g. 'Conv2D_0/.*'), each "
                        "matching a whole path: those parameters are not updated (no weight decay "
                        "either)"),
        "freeze_batch_stats": Field(False, bool,
                                    doc="also keep the moving mean/variance of the normalization "
                                    "layers whose parameters are all frozen (they still normalize "
                                    "with each batch's statistics in training)"),
        "train_step": Field("default", str, choices=lambda: steps.STEPS,
                            doc="registered builder of the train step (cnnlab.train.steps.register_step)"),
        "normalization": Field("scale", str, choices=("scale", "mean_std"),
                               doc="x / 255, or per-channel mean/std of the training images"),
        "mixed_precision": Field(False, (bool, str), _precision_check, convert=_precision,
                                 doc="compute in bfloat16, parameters in float32: True, False, "
                                 "or auto (bfloat16 where the hardware computes it natively: GPU, "
                                 "TPU, CPUs with AMX or AVX-512 BF16; float32 elsewhere; the run's "
                                 "config.json records the choice)"),
        "ema": {
            "decay": Field(0.0, float, in_range(0, 1), "model EMA: the weights' exponential moving "
                           "average with this decay (0: off), evaluated as val_ema/<metric> and "
                           "test_ema/<metric>, selectable as the best checkpoint", traceable=True),
            "warmup": Field(True, bool, doc="decay min(decay, (1 + t) / (10 + t)) at update t"),
        },
        "conv_formulation": Field("auto", str, _formulation_check, doc="how convolutions and their "
                                  "gradients are computed: auto (measured per shape), xla, onednn, or "
                                  "<input grad>/<kernel grad>; $CNNLAB_CONV_FORMULATION overrides it"),
        "image_data_format": Field("channels_last", str, choices=("channels_last", "channels_first"),
                                   doc="the layout the model computes in (images arrive channels_last); "
                                   "$CNNLAB_IMAGE_DATA_FORMAT overrides it"),
        "checkpoint": {
            "every_epochs": _positive_int(1, "latest checkpoint every this many epochs"),
            "every_steps": Field(0, int, at_least(0), "also every this many steps (0: epoch ends only)"),
            "keep": _positive_int(2, "latest checkpoints kept"),
            "best_metric": Field("val/accuracy", str, doc="selects the best checkpoint: val/<m> or "
                                 "test/<m> for m in metrics, train/loss, train/accuracy"),
            "best_mode": Field("max", str, choices=("max", "min"), doc="whether larger best_metric is better"),
            "select_on_test": Field(False, bool, doc="allow a test/ best_metric (model selection on test)"),
        },
        "log_every_steps": Field(20, int, at_least(1), "train metrics every this many steps",
                                 affects_results=False),
        "eval_every_epochs": _positive_int(1, "evaluate every this many epochs"),
        "progress": Field(True, bool, doc="show a progress bar", affects_results=False),
    }


def default_config() -> ml_collections.ConfigDict:
    """Every training field with its default value."""
    return schema_defaults(train_schema())


def config_help() -> str:
    """Every config field as ``key (type, default): doc`` lines, then each registered model's
    arguments (``model.kwargs.<name>``, from its dataclass fields)."""
    lines = field_docs(train_schema())
    for name in models.MODELS.names():
        lines += ["", f"model.kwargs for model.name={name}:"]
        lines += field_docs(models.model_schema(name), prefix="model.kwargs.")
    return "\n".join(lines)


def selection_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The metric keys a run records that may select checkpoints or rank sweep trials (with a
    model EMA, its ``val_ema/`` and ``test_ema/`` metrics too)."""
    splits = ("val", "test", *(("val_ema", "test_ema") if optim.ema_decay(config) else ()))
    return (*(f"{split}/{m}" for split in splits for m in config.metrics), *TRAIN_METRICS)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` checked against the schema, with every default filled in and values normalized.

    Raises:
      ConfigError: the first problem, naming the key and the bad value.
    """
    c = ml_collections.ConfigDict(resolve(train_schema(), config))
    fields = models.model_schema(c.model.name)
    kwargs = {}
    for key, value in c.model.kwargs.items():
        if key == "num_classes":
            raise invalid("model.kwargs.num_classes", value, "set from the data; remove it")
        if key not in fields:
            raise unknown(f"model.kwargs.{key}", [f"model.kwargs.{f}" for f in sorted(fields)])
        kwargs[key] = fields[key].resolve(f"model.kwargs.{key}", value)
    c.model.kwargs = kwargs
    if c.schedule.warmup_epochs > c.num_epochs:
        raise invalid("schedule.warmup_epochs", c.schedule.warmup_epochs,
                      f"must be <= num_epochs={c.num_epochs}")
    _check_best_metric(c)
    return c


def has_validation(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's data has a validation split (a carve, or k-fold validation)."""
    return bool(config.data.val_fraction or config.data.get("folds", 0))


def _check_best_metric(c: ml_collections.ConfigDict) -> None:
    best = c.checkpoint.best_metric
    if best not in selection_metrics(c):
        raise invalid("checkpoint.best_metric", best, one_of(best, list(selection_metrics(c))))
    if best.startswith(("val/", "val_ema/")) and not has_validation(c):
        raise ConfigError(f"config key 'checkpoint.best_metric': {best!r} needs a validation split, "
                          "but data.val_fraction is 0 (set data.val_fraction > 0, or data.folds)")
    if best.startswith(("test/", "test_ema/")):
        if not c.checkpoint.select_on_test:
            raise ConfigError(f"config key 'checkpoint.best_metric': {best!r} selects the model on "
                              "the test set; use a val/ metric, or set checkpoint.select_on_test=True")
        warnings.warn(f"checkpoint.best_metric={best!r}: the test set is used for model selection, "
                      "so its metrics are no longer an unbiased estimate", UserWarning, stacklevel=2)
