"""The canonical trainer: ``train_and_evaluate(config, workdir)``, read top to bottom.

Re-running the same command resumes from the latest checkpoint: the state (parameters,
optimizer, batch statistics, RNG, the epoch's running sums) is restored and the data stream is
restarted at the restored global step, so a killed run ends with exactly the metrics an
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from cnnlab import data as data_lib
from cnnlab import models, nn
from cnnlab.train import report as report_lib
from cnnlab.train.checkpoint import Checkpoints
from cnnlab.train.config import validate_config
from cnnlab.train.distributed import is_main_process, process_slice
from cnnlab.train.optim import make_optimizer
from cnnlab.train.steps import (
    TrainState,
    chunk_unroll,
    create_train_state,
    make_eval_step,
    make_train_step,
    zero_sums,
)
from cnnlab.train.writers import MetricWriter, write_json_atomic

# Fault injection for the kill-and-resume test: SIGKILL this process right after this global
# step (after any checkpoint of that step), exactly as an external `kill -9` would.
_FAULT_KILL_AT_STEP = "CNNLAB_FAULT_KILL_AT_STEP"


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite; names the step."""


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

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def _make_normalize(config: ml_collections.ConfigDict, train_images: np.ndarray):
    if config.normalization == "scale":
        return lambda images: data_lib.normalize(images, "scale")
    mean, std = data_lib.channel_mean_std(train_images)
    return lambda images: data_lib.normalize(images, "mean_std", mean, std)


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


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Validates the config, loads the data and builds model, optimizer and device mesh."""
    config = validate_config(config)
    devices = jax.devices()
    config = resolve_batch_size(config, len(devices))
    dataset = data_lib.load_dataset(config.data, verbose=is_main_process())
    n_train = len(dataset.train.labels)
    if n_train < config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {n_train} training images; lower it."
        )
    steps_per_epoch = n_train // config.batch_size
    kwargs = dict(config.model.kwargs.to_dict())
    if config.mixed_precision:
        kwargs["dtype"] = jnp.bfloat16
    model = models.get_model(config.model.name, num_classes=len(dataset.class_names), **kwargs)
    tx = make_optimizer(config, max(steps_per_epoch // config.grad_accum_steps, 1))
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return Experiment(
        config=config,
        dataset=dataset,
        model=model,
        tx=tx,
        mesh=data_lib.data_mesh(devices),
        steps_per_epoch=steps_per_epoch,
        normalize=_make_normalize(config, dataset.train.images),
        image_shape=tuple(dataset.train.images.shape[1:]),
    )


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initial_state(exp: Experiment) -> TrainState:
    """A fresh state, replicated over the mesh."""
    state = jax.jit(
        lambda: create_train_state(
            exp.model, exp.tx, seed=exp.config.seed, image_shape=exp.image_shape
        ),
        out_shardings=_replicated(exp.mesh),
    )()
    return state


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_split(exp: Experiment, eval_step, state: TrainState, split) -> dict[str, Any]:
    """Loss, accuracy, top-5 and mean per-class accuracy on a split; every image counted once."""
    totals = None
    rows = process_slice(exp.config.eval_batch_size)
    batches = (
        {k: v[rows] for k, v in batch.items()}
        for batch in data_lib.iterate_epoch(
            split.images, split.labels, exp.config.eval_batch_size, shuffle=False,
            drop_remainder=False,
        )
    )
    sharding = data_lib.batch_sharding(exp.mesh)
    for batch in data_lib.prefetch_to_device(batches, 2, sharding):
        sums = eval_step(state.params, state.batch_stats, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return metrics_from_sums(jax.device_get(totals))


def metrics_from_sums(totals: dict[str, Any]) -> dict[str, Any]:
    """Loss, accuracy, top-5 and mean per-class accuracy (plus ``count`` and ``confusion``)
    from an eval step's sums over a whole split (host arrays)."""
    confusion = np.asarray(totals["confusion"])
    count = float(totals["count"])
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros_like(support), where=support > 0)
    return {
        "loss": float(totals["loss"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "top5_accuracy": float(totals["top5"]) / count,
        "mean_per_class_accuracy": float(per_class[support > 0].mean()),
        "count": int(count),
        "confusion": confusion,
    }


def train_record(epoch: int, sums: dict[str, Any]) -> dict[str, Any]:
    """The epoch record's training part from a state's ``epoch_sums`` (host values)."""
    count = max(float(sums["count"]), 1.0)
    return {"epoch": epoch, "train/loss": float(sums["loss"]) / count,
            "train/accuracy": float(sums["correct"]) / count}


def eval_splits(exp: Experiment) -> dict[str, Any]:
    splits = {"test": exp.dataset.test}
    if getattr(exp.dataset, "val", None) is not None and len(exp.dataset.val.labels):
        splits["val"] = exp.dataset.val
    return splits


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                dynamic_ncols=True, leave=False)


def _check_finite(state: TrainState, ckpt: Checkpoints) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        last = ckpt.latest_step()
        raise NonFiniteLossError(
            f"Non-finite training loss at step {bad}; stopping. The last good checkpoint "
            f"(step {last}) is kept in {ckpt.latest.directory}."
            if last is not None
            else f"Non-finite training loss at step {bad}; stopping (no checkpoint was written yet)."
        )


class StopTraining(Exception):
    """Raised by an ``on_epoch_end`` callback to end a run early (e.g. a sweep pruning a trial);
    the run's checkpoints, metrics and reports stay as they are at that epoch."""


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns the final
    evaluation metrics.

    ``on_epoch_end(epoch, record)`` is called after each evaluation with the epoch's metrics
    record (the one written to ``metrics.jsonl``); it may raise :class:`StopTraining`.
    """
    return train(config, workdir, on_epoch_end=on_epoch_end)[1]


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """:func:`train_and_evaluate`, also returning the final train state (on the mesh)."""
    exp = build_experiment(config)
    config = exp.config
    os.makedirs(workdir, exist_ok=True)
    if is_main_process():
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
        write_json_atomic(os.path.join(workdir, "classes.json"), list(exp.dataset.class_names))

    ckpt = Checkpoints(
        workdir,
        keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric,
        best_mode=config.checkpoint.best_mode,
    )
    state = initial_state(exp)
    start_step = 0
    if ckpt.latest_step() is not None:
        state, start_step = ckpt.restore(state)
        say(f"Resuming from step {start_step} ({ckpt.latest.directory}).")
    constraints = nn.collect_constraints(
        exp.model, jnp.zeros((1, *exp.image_shape), jnp.float32), training=False
    )
    augment = data_lib.make_batch_augment_fn(config.data.augment, exp.num_classes)

    def preprocess(key, images, labels):
        images, targets = augment(key, images, labels)
        return exp.normalize(images), targets

    step_fn = make_train_step(
        exp.model,
        exp.tx,
        num_classes=exp.num_classes,
        preprocess=preprocess,
        constraints=constraints,
        label_smoothing=config.loss.label_smoothing,
    )
    # One jitted program for a single step and one for a chunk of `steps_per_dispatch` steps
    # (lax.scan, unrolled on CPU), each compiled once; state buffers are donated.
    train_step = jax.jit(step_fn, donate_argnums=0)
    train_chunk = jax.jit(
        lambda st, batches: jax.lax.scan(step_fn, st, batches, unroll=chunk_unroll()), donate_argnums=0
    )
    reset_sums = jax.jit(lambda st: st.replace(epoch_sums=zero_sums()), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(exp.model, num_classes=exp.num_classes, normalize=exp.normalize))
    writer = MetricWriter(workdir, resume_step=start_step, enabled=is_main_process())
    total_steps = config.num_epochs * exp.steps_per_epoch
    stream = _host_chunks(exp, start_step)
    say(
        f"Training {config.model.name} on {len(exp.dataset.train.labels)} images "
        f"({exp.num_classes} classes), {config.num_epochs} epochs x {exp.steps_per_epoch} steps, "
        f"batch {config.batch_size}, {len(exp.mesh.devices.flat)} device(s) in "
        f"{jax.process_count()} process(es) [{jax.devices()[0].platform}]."
    )
    final: dict[str, Any] = {}
    kill_at = int(os.environ.get(_FAULT_KILL_AT_STEP, "-1"))
    step = start_step
    bar = _progress(total_steps, start_step, config.progress and is_main_process(), "train")
    t_window, n_window = time.perf_counter(), 0
    try:
        for chunk in data_lib.prefetch_to_device(stream, 2, _chunk_sharding(exp.mesh)):
            k = chunk["label"].shape[0]
            if k == 1:
                state, metrics = train_step(state, jax.tree_util.tree_map(lambda a: a[0], chunk))
            else:
                state, metrics = train_chunk(state, chunk)
                metrics = jax.tree_util.tree_map(lambda a: a[-1], metrics)
            previous, step = step, step + k
            n_window += k * config.batch_size
            bar.update(k)
            epoch, step_in_epoch = divmod(step, exp.steps_per_epoch)
            if _crossed(previous, step, config.log_every_steps):
                metrics = jax.device_get(metrics)
                _check_finite(state, ckpt)
                rate = n_window / max(time.perf_counter() - t_window, 1e-9)
                t_window, n_window = time.perf_counter(), 0
                writer.write("train", step, {**metrics, "images_per_sec": rate})
                bar.set_postfix(epoch=epoch + (step_in_epoch > 0), loss=f"{float(metrics['loss']):.3f}",
                                acc=f"{float(metrics['accuracy']):.3f}", img_s=f"{rate:.0f}")
            if step_in_epoch and _crossed(previous, step, config.checkpoint.every_steps):
                _check_finite(state, ckpt)
                ckpt.save_latest(step, state)
            if step_in_epoch == 0:
                final = _end_of_epoch(exp, state, epoch, step, eval_step, writer, ckpt, bar)
                state = reset_sums(state)
                if epoch % config.checkpoint.every_epochs == 0 or step == total_steps:
                    ckpt.save_latest(step, state)
                if on_epoch_end is not None:
                    try:
                        on_epoch_end(epoch, final)
                    except StopTraining:
                        ckpt.save_latest(step, state)
                        break
            if previous < kill_at <= step:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        writer.close()
    _check_finite(state, ckpt)
    if not final:  # resumed after the last epoch: evaluate what we have
        final = evaluate(config, workdir, which="latest", exp=exp)
    if is_main_process():
        report_lib.write_reports(workdir, exp.dataset.class_names)
    ckpt.close()
    return state, {k: v for k, v in final.items() if k != "confusion"}


def say(message: str) -> None:
    """Prints on the main process only."""
    if is_main_process():
        print(message, flush=True)


def _crossed(previous: int, step: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(previous, step]`` (0 disables)."""
    return bool(every) and step // every > previous // every


def _chunk_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def _host_chunks(exp: Experiment, start_step: int):
    """This process's slice of the training stream, ``steps_per_dispatch`` batches at a time,
    stacked on a leading axis; a chunk never crosses an epoch boundary."""
    config = exp.config
    rows = process_slice(config.batch_size)
    stream = data_lib.iterate_train(
        exp.dataset.train.images,
        exp.dataset.train.labels,
        config.batch_size,
        seed=config.seed,
        start_step=start_step,
        num_epochs=config.num_epochs,
    )
    step, pending = start_step, []
    for batch in stream:
        pending.append({k: v[rows] for k, v in batch.items()})
        step += 1
        if len(pending) == config.steps_per_dispatch or step % exp.steps_per_epoch == 0:
            yield {k: np.stack([b[k] for b in pending]) for k in pending[0]}
            pending = []


def _end_of_epoch(exp, state, epoch, step, eval_step, writer, ckpt, bar) -> dict[str, Any]:
    config = exp.config
    _check_finite(state, ckpt)
    record = train_record(epoch, jax.device_get(state.epoch_sums))
    results = {}
    if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
        for name, split in eval_splits(exp).items():
            results[name] = evaluate_split(exp, eval_step, state, split)
            for key, value in results[name].items():
                if key not in ("confusion", "count"):
                    record[f"{name}/{key}"] = value
        writer.write("epoch", step, record)
        ckpt.save_best(step, state, record)
        if "test" in results and is_main_process():
            np.save(os.path.join(os.path.dirname(writer.path), "confusion_last.npy"), results["test"]["confusion"])
    summary = "  ".join(
        f"{k}={v:.4f}" for k, v in record.items() if k != "epoch" and isinstance(v, float)
    )
    if is_main_process():
        bar.write(f"epoch {epoch:3d}/{config.num_epochs}  {summary}")
    return record


# ---------------------------------------------------------------------------------------------
# Re-evaluation of a finished (or interrupted) run
# ---------------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config.json in {workdir!r}: is it a cnnlab run directory?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    which: str = "best",
    exp: Experiment | None = None,
) -> dict[str, Any]:
    """Evaluates the ``best`` (or ``latest``) checkpoint of ``workdir`` on every eval split and
    writes ``eval_<which>.json``; returns the metrics."""
    if exp is None:
        exp = build_experiment(config if config is not None else load_run_config(workdir))
    ckpt = Checkpoints(
        workdir,
        keep=exp.config.checkpoint.keep,
        best_metric=exp.config.checkpoint.best_metric,
        best_mode=exp.config.checkpoint.best_mode,
    )
    if which == "best" and ckpt.best.latest_step() is None:
        which = "latest"
    state, step = ckpt.restore(initial_state(exp), which=which)
    eval_step = jax.jit(make_eval_step(exp.model, num_classes=exp.num_classes, normalize=exp.normalize))
    out: dict[str, Any] = {"checkpoint": which, "step": step}
    for name, split in eval_splits(exp).items():
        res = evaluate_split(exp, eval_step, state, split)
        out.update({f"{name}/{k}": v for k, v in res.items() if k != "confusion"})
        if is_main_process():
            np.save(os.path.join(workdir, f"confusion_{name}_{which}.npy"), res["confusion"])
    if is_main_process():
        write_json_atomic(os.path.join(workdir, f"eval_{which}.json"), out)
    ckpt.close()
    return out
