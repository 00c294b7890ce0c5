"""What a group of trials shares: the validated config, the data, the model, the device mesh."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnnlab import backend, models, runfiles
from cnnlab import data as data_lib
from cnnlab._notices import say_once
from cnnlab.data.augmentations import AUGMENT_OPS
from cnnlab.data.config import image_hw
from cnnlab.native import conv_impl
from cnnlab.train import losses, optim
from cnnlab.train.checkpoint import Checkpoints
from cnnlab.train.config import train_schema, validate_config
from cnnlab.train.distributed import is_main_process
from cnnlab.train.metrics import METRICS
from cnnlab.train.steps import STEPS, TrainState, create_train_state


@dataclasses.dataclass
class Experiment:
    """Everything derived from a config that training, evaluation and reports share."""

    config: ml_collections.ConfigDict
    dataset: Any
    model: Any
    tx: Any
    mesh: Any
    steps_per_epoch: int
    normalize: Any
    image_shape: tuple[int, ...]
    normalization: dict[str, Any]
    #: the loss's extra inputs once :meth:`loss_inputs` has set them up (shared by copies)
    loaded_loss_inputs: list[Any] = dataclasses.field(default_factory=list, repr=False)
    #: with k-fold validation (``data.folds``): ``{fold: Dataset}`` of the folds loaded, the
    #: config's own included (shared by copies)
    fold_datasets: dict[int, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    def loss_inputs(self) -> losses.LossInputs | None:
        """The loss's :class:`~cnnlab.train.losses.LossInputs` (e.g. a teacher's model and
        weights), set up on first use and kept: training needs them, evaluation never asks.
        Its variables are replicated over the mesh; ``None`` for a loss that needs only logits.

        Raises:
          ConfigError: the loss's setup refuses the config (e.g. a teacher that is no run).
        """
        if not self.loaded_loss_inputs:
            inputs = losses.setup_inputs(self.config, num_classes=self.num_classes,
                                         image_shape=self.image_shape, normalization=self.normalization)
            if inputs is not None:
                inputs = losses.LossInputs(inputs.apply, jax.device_put(inputs.variables, replicated(self.mesh)))
            self.loaded_loss_inputs.append(inputs)
        return self.loaded_loss_inputs[0]

    def dataset_for(self, config: ml_collections.ConfigDict) -> Any:
        """The data of another pack-compatible config: this one's, or with k-fold validation
        that config's fold (loaded by :func:`build_experiment`'s ``folds``)."""
        if not config.data.get("folds") or config.data.fold == self.config.data.fold:
            return self.dataset
        if config.data.fold not in self.fold_datasets:
            raise ValueError(f"data.fold={config.data.fold} was not loaded with this experiment "
                             f"(folds {sorted(self.fold_datasets)}): pass it to build_experiment")
        return self.fold_datasets[config.data.fold]

    def for_config(self, config: ml_collections.ConfigDict) -> Experiment:
        """The same mesh (and data, or its own fold's) for another (validated,
        pack-compatible) config: its own model and optimizer."""
        if config is self.config:
            return self
        exp = dataclasses.replace(self, config=config, dataset=self.dataset_for(config),
                                  tx=optim.make_optimizer(config, self.steps_per_epoch))
        exp.model = exp.model_with()
        return exp

    def model_with(self, **overrides: Any) -> Any:
        """The config's model with some fields replaced (e.g. traced dropout rates)."""
        return build_model(self.config, self.num_classes, **overrides)


def _announce_once(message: str) -> None:
    say_once(message, topic="choice", prefix="", show=is_main_process())


def mixed_precision_choice(value: bool | str) -> tuple[bool, str]:
    """``(bfloat16, why)`` for a ``mixed_precision`` value: ``"auto"`` is bfloat16 where the
    hardware computes it natively (GPU, TPU, or a CPU with AMX or AVX-512 BF16 whose ISA is not
    limited, with oneDNN's bfloat16 convolutions) and float32 elsewhere."""
    if value != "auto":
        return bool(value), "set in the config"
    return conv_impl.native_bfloat16()


def resolve_mixed_precision(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``mixed_precision`` decided for this machine (``"auto"`` -> True or
    False, said once per process, and recorded as such in the run's ``config.json``). True on
    a CPU without native bfloat16 is kept, and said once: there each bfloat16 convolution runs
    on whichever of XLA's bfloat16 and oneDNN's float32 (rounded to bfloat16) measures faster."""
    value = config.mixed_precision
    if not value:
        return config
    native, why = conv_impl.native_bfloat16()
    if value == "auto":
        _announce_once(f"mixed_precision=auto: {'bfloat16' if native else 'float32'} ({why}).")
        config = ml_collections.ConfigDict({**config.to_dict(), "mixed_precision": native})
    elif not native:
        _announce_once(
            f"mixed_precision=True on a CPU without native bfloat16 ({why}): "
            "each bfloat16 convolution runs on the faster of XLA's emulated bfloat16 and oneDNN's "
            "float32 rounded to bfloat16; float32 (mixed_precision=False) may be faster here.")
    return config


#: Config fields that environment variables override (an override is recorded in the run's
#: config.json as the value used, so a resume under another setting is a config change).
ENV_OVERRIDES = {"conv_formulation": conv_impl.FORMULATION_ENV,
                 "image_data_format": "CNNLAB_IMAGE_DATA_FORMAT"}


def resolve_env_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the fields of :data:`ENV_OVERRIDES` taken from their environment
    variables where set (said once per process when that changes the config's value)."""
    values = config.to_dict()
    for key, var in ENV_OVERRIDES.items():
        env = os.environ.get(var, "").strip()
        if env and env.lower() != str(values[key]).lower():
            field = train_schema()[key]
            values[key] = field.resolve(f"{key} (from ${var})", env.lower())
            _announce_once(f"{key}={values[key]!r} from ${var} (the config says {config[key]!r}).")
    return ml_collections.ConfigDict(values)


def build_model(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> Any:
    """The config's model for ``num_classes`` (bfloat16 compute with ``mixed_precision``;
    ``"auto"`` as :func:`mixed_precision_choice` decides), computing in the config's
    ``image_data_format`` with its ``conv_formulation`` (:func:`in_run_context`)."""
    kwargs = dict(config.model.kwargs.to_dict(), num_classes=num_classes)
    if mixed_precision_choice(config.mixed_precision)[0]:
        kwargs["dtype"] = jnp.bfloat16
    model = models.get_model(config.model.name, **{**kwargs, **overrides})
    return in_run_context(model, conv_formulation=config.get("conv_formulation", "auto"),
                          image_data_format=config.get("image_data_format", "channels_last"))


def in_run_context(model: Any, *, conv_formulation: str, image_data_format: str) -> Any:
    """``model`` whose calls (init, apply, every trace) run with ``conv_formulation`` and
    ``image_data_format`` in force, taking channels_last images (transposed to channels_first
    when that is the format). The same module class, so its variables are the model's own."""
    cls = type(model)
    if getattr(cls, "_run_context", None) is not None:
        cls = cls.__mro__[1]

    @functools.wraps(cls.__call__)
    def __call__(self, x, *args, **kwargs):  # noqa: N807
        with conv_impl.formulation(conv_formulation), backend.image_data_format_scope(image_data_format):
            if image_data_format == "channels_first" and x.ndim == 4:
                x = jnp.transpose(x, (0, 3, 1, 2))
            return cls.__call__(self, x, *args, **kwargs)

    context = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__,
                                          "_run_context": (conv_formulation, image_data_format)})
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")}
    return context(**fields)


PREPROCESSING_FILE = runfiles.PREPROCESSING


def normalization_record(config: ml_collections.ConfigDict, train_images: np.ndarray) -> dict[str, Any]:
    """``{"normalization", "mean"?, "std"?}``: what normalizing needs, recorded in the run
    (``preprocessing.json``) because inference cannot recompute the training images' statistics."""
    record: dict[str, Any] = {"normalization": config.normalization}
    if config.normalization == "mean_std":
        record["mean"], record["std"] = data_lib.channel_mean_std(train_images)
    return record


def statistics_images(config: ml_collections.ConfigDict, dataset: Any) -> np.ndarray:
    """The images whose statistics normalize: the training split's; with k-fold validation
    all the folds' (training and validation, in file order), so that every fold normalizes
    alike and the folds pack into one program. (Pixel statistics only: no label is used.)"""
    if not config.data.get("folds") or config.normalization != "mean_std":
        return dataset.train.images
    order = np.argsort(np.concatenate([dataset.train.indices, dataset.val.indices]), kind="stable")
    return np.concatenate([dataset.train.images, dataset.val.images])[order]


def make_normalize(record: dict[str, Any]):
    """``images uint8 -> float32`` as training normalizes them, from :func:`normalization_record`."""
    return lambda images: data_lib.normalize(images, record["normalization"], record.get("mean"),
                                             record.get("std"))


def resolve_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> ml_collections.ConfigDict:
    """Derives the global batch from ``per_device_batch_size`` when set, and checks that the
    global batches split evenly over the devices."""
    if config.per_device_batch_size:
        config = ml_collections.ConfigDict(config.to_dict())
        config.batch_size = config.per_device_batch_size * num_devices
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % num_devices:
            raise ValueError(
                f"{key}={config[key]} is not divisible by the {num_devices} devices; choose a "
                f"multiple of {num_devices} (or set per_device_batch_size)."
            )
    return config


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The validated config with its global batch size for this machine's devices and its
    ``mixed_precision`` decided for this machine (:func:`resolve_mixed_precision`)."""
    config = resolve_env_overrides(validate_config(config))
    with conv_impl.formulation(config.conv_formulation):  # "auto" precision asks what it allows
        config = resolve_mixed_precision(config)
    return resolve_batch_size(config, jax.device_count())


def build_experiment(config: ml_collections.ConfigDict, *, folds: Sequence[int] = ()) -> Experiment:
    """Validates the config, loads the data and builds model, optimizer and device mesh.
    ``folds``: with k-fold validation, the other validation folds to load as well (for packed
    trials that differ in ``data.fold``; see :meth:`Experiment.dataset_for`)."""
    config = resolve(config)
    if config.data.folds:
        order = [config.data.fold, *sorted(set(folds) - {config.data.fold})]
        loaded = data_lib.load_folds(config.data, order, verbose=is_main_process())
        fold_datasets, dataset = dict(zip(order, loaded, strict=True)), loaded[0]
    else:
        fold_datasets, dataset = {}, data_lib.load_dataset(config.data, verbose=is_main_process())
    n_train = len(dataset.train.labels)
    if n_train < config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {n_train} training images; lower it."
        )
    steps_per_epoch = n_train // config.batch_size
    normalization = normalization_record(config, statistics_images(config, dataset))
    exp = Experiment(
        config=config,
        dataset=dataset,
        model=None,
        tx=optim.make_optimizer(config, steps_per_epoch),
        mesh=data_lib.data_mesh(jax.devices()),
        steps_per_epoch=steps_per_epoch,
        normalize=make_normalize(normalization),
        image_shape=tuple(dataset.train.images.shape[1:]),
        normalization=normalization,
        fold_datasets=fold_datasets,
    )
    exp.model = exp.model_with()
    return exp


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initial_state(exp: Experiment) -> TrainState:
    """A fresh state, replicated over the mesh."""
    return jax.jit(
        lambda: create_train_state(exp.model, exp.tx, seed=exp.config.seed, image_shape=exp.image_shape,
                                   loss_metrics=losses.metric_names(exp.config)),
        out_shardings=replicated(exp.mesh),
    )()


EXTENSIONS_FILE = runfiles.EXTENSIONS


def extension_modules(config: ml_collections.ConfigDict) -> list[dict[str, str]]:
    """``[{"module", "file"}]`` of the modules outside cnnlab that registered what ``config``
    names (model, optimizer, schedule, metrics, augmentation ops, loss, train step), so that
    ``cnnlab eval`` and ``report`` can import them again."""
    used = [(models.MODELS, config.model.name), (optim.OPTIMIZERS, config.optimizer.name),
            (optim.SCHEDULES, config.schedule.name), *((METRICS, m) for m in config.metrics),
            *((AUGMENT_OPS, op) for op in config.data.augment.ops), (losses.LOSSES, config.loss.name),
            (STEPS, config.train_step)]
    names = sorted({m for registry, name in used if (m := registry.module_of(name))} - {None})
    return [{"module": m, "file": getattr(sys.modules.get(m), "__file__", None)}
            for m in names if m.split(".")[0] != "cnnlab"]


def import_extensions(workdir: str) -> None:
    """Imports the user modules a run recorded in ``extensions.json`` (by name, else from file)."""
    path = os.path.join(workdir, EXTENSIONS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        for ext in json.load(f):
            if ext["module"] in sys.modules:
                continue
            try:
                importlib.import_module(ext["module"])
            except ImportError:
                if not ext.get("file") or not os.path.exists(ext["file"]):
                    raise ImportError(
                        f"The run in {workdir!r} uses {ext['module']!r} (from {ext.get('file')}), which "
                        "can no longer be imported; put it back on the Python path.") from None
                spec = importlib.util.spec_from_file_location(ext["module"], ext["file"])
                module = importlib.util.module_from_spec(spec)
                sys.modules[ext["module"]] = module
                spec.loader.exec_module(module)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir (its extension modules imported)."""
    path = os.path.join(workdir, runfiles.CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config.json in {workdir!r}: is it a cnnlab run directory?")
    import_extensions(workdir)
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# ---------------------------------------------------------------------------------------------
# A trained run's model and weights (inference, a distillation teacher)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainedModel:
    """A run's model with the weights of one checkpoint (see :func:`load_trained`):
    ``variables`` are ``{"params", "batch_stats"}``, ``step`` the checkpoint's global step,
    ``which`` the checkpoint (``best`` or ``latest``) they came from, ``normalization`` the
    run's :func:`normalization_record`."""

    workdir: str
    config: ml_collections.ConfigDict
    class_names: list[str]
    model: Any
    variables: dict[str, Any]
    step: int
    which: str
    normalization: dict[str, Any]


def run_normalization(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The :func:`normalization_record` a run recorded (``preprocessing.json``); a run without
    one normalized by ``scale``, which needs no statistics."""
    path = os.path.join(workdir, PREPROCESSING_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if config.normalization == "mean_std":
        raise ValueError(
            f"the run in {workdir!r} normalizes with the training images' mean and std "
            f"(normalization='mean_std') but has no {PREPROCESSING_FILE} recording them; "
            "re-run training in it (it resumes) to record them")
    return {"normalization": config.normalization}


def uses_ema_weights(config: ml_collections.ConfigDict) -> bool:
    """Whether a run's predictions and exports use its model EMA's weights: it keeps one and
    selects its best checkpoint on an EMA metric (``val_ema/...``)."""
    split = config.checkpoint.best_metric.split("/", 1)[0]
    return bool(optim.ema_decay(config)) and split.endswith("_ema")


def load_trained(workdir: str, *, which: str = "best") -> TrainedModel:
    """The model of the run in ``workdir`` with the weights of its ``best`` checkpoint (the
    ``latest`` when it has no best) or its ``latest``, from the run directory alone (no data);
    the model EMA's weights where the run selects on them (:func:`uses_ema_weights`).

    Raises:
        FileNotFoundError: ``workdir`` is not a run directory or has no checkpoint.
        ValueError: an unknown ``which``, or a ``mean_std`` run without ``preprocessing.json``.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    config = load_run_config(workdir)
    classes = os.path.join(workdir, runfiles.CLASSES)
    if not os.path.exists(classes):
        raise FileNotFoundError(f"No classes.json in {workdir!r}: is it a cnnlab run directory?")
    with open(classes) as f:
        class_names = list(json.load(f))
    if not os.path.isdir(os.path.join(workdir, runfiles.CHECKPOINTS, runfiles.LATEST)):
        raise FileNotFoundError(f"No checkpoints in {workdir!r}: the run has not saved a step yet.")
    normalization = run_normalization(workdir, config)

    model = build_model(config, len(class_names))
    h, w = image_hw(config.data.image_size)
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda: model.init({"params": key, "dropout": key},
                                               jnp.zeros((1, h, w, 3), jnp.float32), training=False))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    c = config.checkpoint
    use_ema = uses_ema_weights(config)
    if use_ema:  # the model EMA's weights (kept in the optimizer state) were selected
        tree["opt_state"] = {"ema": shapes["params"]}
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), tree)
    ckpt = Checkpoints(workdir, keep=c.keep, best_metric=c.best_metric, best_mode=c.best_mode)
    try:
        variables, step, which = ckpt.restore_variables(target, which=which)
    finally:
        ckpt.close()
    if use_ema:
        variables = {"params": variables["opt_state"]["ema"], "batch_stats": variables["batch_stats"]}
    return TrainedModel(workdir=workdir, config=config, class_names=class_names, model=model,
                        variables=variables, step=step, which=which, normalization=normalization)
