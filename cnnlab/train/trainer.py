"""The canonical trainer: one loop for a group of K >= 1 trials, read top to bottom.

``train_and_evaluate(config, workdir)`` is a group of one; a sweep passes K packed trials to
:func:`train_trials`. Checkpoint cadence, the NaN stop, exact resume, evaluation sharded over
devices and processes, metrics, reports and callbacks exist once, here.

Re-running the same command resumes from the latest checkpoint: the state (parameters,
optimizer, batch statistics, RNG, the epoch's running sums) is restored and the data stream is
restarted at the restored global step, so a killed run ends with exactly the metrics an
uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from cnnlab import data as data_lib
from cnnlab import runfiles
from cnnlab.train import finetune, optim, rundir
from cnnlab.train import report as report_lib
from cnnlab.train.checkpoint import Checkpoints
from cnnlab.train.distributed import is_main_process, process_slice
from cnnlab.train.experiment import (
    EXTENSIONS_FILE,
    PREPROCESSING_FILE,
    Experiment,
    build_experiment,
    extension_modules,
    initial_state,
    load_run_config,
    make_normalize,
    resolve,
)
from cnnlab.train.metrics import split_values
from cnnlab.train.optim import learning_rate_at
from cnnlab.train.packing import NotPackable, Program, TrialOutcome, build_program, pack_key
from cnnlab.train.packing import varying as varying_fields
from cnnlab.train.writers import MetricWriter, image_grid, write_json_atomic

# Fault injection for the kill-and-resume tests: SIGKILL this process right after this global
# step (after any checkpoint of that step), exactly as an external `kill -9` would.
_FAULT_KILL_AT_STEP = "CNNLAB_FAULT_KILL_AT_STEP"


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite; names the step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the step, the last checkpoint and how to resume."""


class StopTraining(Exception):
    """Raised by an ``on_epoch_end`` callback to end a trial early (e.g. a sweep pruning it);
    its checkpoints, metrics and reports stay as they are at that epoch."""


EpochCallback = Callable[[int, int, dict[str, Any]], None]


def say(message: str) -> None:
    """Prints on the main process only."""
    if is_main_process():
        print(message, flush=True)


@contextlib.contextmanager
def _finish_before_interrupt(what: str):
    """Holds a Ctrl-C (SIGINT) that arrives in the block until the block is done, then raises
    it: an epoch's evaluation, records and checkpoint are written whole (an orbax save cut
    short is dropped, so a resume would start an epoch earlier). A second Ctrl-C stops at once.

    Only where Python's own SIGINT handler is installed, in the main thread: a handler of the
    caller's, an ignored SIGINT and an enclosing block are left as they are."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []

    def hold(signum, frame) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        print(f"Ctrl-C: finishing {what} before stopping (Ctrl-C again stops now, losing it).",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _crossed(previous: int, step: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(previous, step]`` (0 disables)."""
    return bool(every) and step // every > previous // every


# ---------------------------------------------------------------------------------------------
# Evaluation (sharded over devices and processes, every image counted once)
# ---------------------------------------------------------------------------------------------


def eval_splits(exp: Experiment) -> dict[str, Any]:
    """The evaluated splits of the experiment's data: ``val`` (when it has one) and ``test``."""
    return _eval_splits_of(exp.dataset)


def _eval_splits_of(dataset: Any) -> dict[str, Any]:
    splits = {}
    if getattr(dataset, "val", None) is not None and len(dataset.val.labels):
        splits["val"] = dataset.val
    splits["test"] = dataset.test
    return splits


def _each_trial_batches(splits: Sequence[Any], batch_size: int, rows: slice):
    """Evaluation batches with a leading trial axis, trial ``k``'s from ``splits[k]`` (in order,
    padded as alone); a trial whose split has fewer batches gets empty ones (all masked),
    which add nothing to its sums."""
    iters = [data_lib.iterate_epoch(s.images, s.labels, batch_size, shuffle=False, drop_remainder=False)
             for s in splits]
    for _ in range(max(s.num_batches(batch_size) for s in splits)):
        batches = [next(it, None) for it in iters]
        template = next(b for b in batches if b is not None)
        batches = [b if b is not None else {k: np.zeros_like(v) for k, v in template.items()}
                   for b in batches]
        yield {k: np.stack([b[k][rows] for b in batches]) for k in template}


def evaluate_trials(exp: Experiment, prog: Program, states: Any,
                    datasets: Sequence[Any] | None = None) -> list[dict[str, dict[str, Any]]]:
    """``[{split: metrics}]`` per trial, for every eval split. ``datasets``: each trial's data
    (:meth:`Experiment.dataset_for`) where packed trials validate on their own folds."""
    rows = process_slice(exp.config.eval_batch_size)
    out: list[dict[str, dict[str, Any]]] = [{} for _ in range(prog.size)]
    for name, split in eval_splits(exp).items():
        own = [_eval_splits_of(d)[name] for d in datasets] if datasets else [split]
        if any(s is not split for s in own):  # each trial its own split (its validation fold)
            batches, sums_of = _each_trial_batches(own, exp.config.eval_batch_size, rows), prog.eval_sums_each
            sharding = prog.eval_each_sharding
        else:
            batches = (
                {k: v[rows] for k, v in batch.items()}
                for batch in data_lib.iterate_epoch(split.images, split.labels, exp.config.eval_batch_size,
                                                    shuffle=False, drop_remainder=False)
            )
            sums_of, sharding = prog.eval_sums, prog.eval_sharding
        # Every batch's sums stay on the device until the pass ends, then add up on the host in
        # batch order (the same float32 additions as on the device): an addition per batch
        # would wait for that batch, so the next one could not be dispatched behind it.
        pending = [sums_of(states, batch) for batch in data_lib.prefetch_to_device(batches, 2, sharding)]
        totals = functools.reduce(lambda a, b: jax.tree_util.tree_map(np.add, a, b), jax.device_get(pending))
        for k in range(prog.size):
            out[k][name] = split_values(exp.config.metrics, prog.take(totals, k))
    return out


def evaluate_with_ema(exp: Experiment, prog: Program, states: Any,
                      datasets: Sequence[Any] | None = None) -> list[dict[str, dict[str, Any]]]:
    """:func:`evaluate_trials`, plus each split evaluated with the model EMA's weights as
    ``<split>_ema`` where the config keeps one (with the current batch statistics)."""
    out = evaluate_trials(exp, prog, states, datasets)
    ema = optim.ema_params(states.opt_state)
    if ema is not None:
        for k, results in enumerate(evaluate_trials(exp, prog, states.replace(params=ema), datasets)):
            out[k].update({f"{split}_ema": values for split, values in results.items()})
    return out


def train_record(epoch: int, sums: dict[str, Any]) -> dict[str, Any]:
    """The epoch record's training part from a state's ``epoch_sums`` (host values): the
    epoch's mean loss and accuracy, and ``train/<metric>`` for each metric the loss reports."""
    count = max(float(sums["count"]), 1.0)
    return {"epoch": epoch, "train/loss": float(sums["loss"]) / count,
            "train/accuracy": float(sums["correct"]) / count,
            **{f"train/{m}": float(v) / count for m, v in sums.get("loss_metrics", {}).items()}}


def step_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """A per-step record's values from a train step's metrics (host values): the step's own
    (``loss``, ``ce``, ``accuracy``, whatever a registered step adds) and ``train/<metric>`` for
    each metric the loss reports (their batch means)."""
    record = {k: v for k, v in metrics.items() if k != "loss_metrics"}
    record.update({f"train/{m}": v for m, v in metrics.get("loss_metrics", {}).items()})
    return record


def _flat(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{split}/{m}": v for split, res in results.items() for m, v in res.items()
            if m not in ("confusion", "count")}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns the final
    evaluation metrics. ``on_epoch_end(epoch, record)`` runs after each evaluation with the
    record written to ``metrics.jsonl``; it may raise :class:`StopTraining`."""
    return train(config, workdir, on_epoch_end=on_epoch_end, allow_config_change=allow_config_change)[1]


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    allow_config_change: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """:func:`train_and_evaluate`, also returning the final train state (on the mesh; ``None``
    when the run had finished already and was only re-evaluated)."""
    callback = None if on_epoch_end is None else (lambda _k, epoch, record: on_epoch_end(epoch, record))
    (outcome,), states, _ = _train_trials([config], [workdir], on_epoch_end=callback,
                                          allow_config_change=allow_config_change)
    if outcome.error is not None:
        raise outcome.error
    return states, outcome.metrics


def train_trials(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str],
    *,
    on_epoch_end: EpochCallback | None = None,
    tag: Callable[[int], str] | None = None,
    vmap_width: int | None = None,
    allow_config_change: bool = False,
) -> tuple[list[TrialOutcome], dict[str, float]]:
    """Trains K >= 1 trials (equal :func:`~cnnlab.train.packing.pack_key` when K > 1), trial
    ``k`` in ``workdirs[k]``, in one compiled program; resumes each from its checkpoint.

    ``on_epoch_end(k, epoch, record)`` runs for each running trial after each evaluation and may
    raise :class:`StopTraining` (that trial stops; the others go on). A trial whose loss becomes
    non-finite stops with a :class:`NonFiniteLossError` in its outcome. Trials that finished
    already are re-evaluated; trials resumed from different steps run as separate groups.
    Returns each trial's :class:`TrialOutcome` and timings in seconds (``setup``,
    ``first_step`` (compile and run), ``steps``, ``eval``, ``save``, ``total``).
    """
    outcomes, _, timings = _train_trials(configs, workdirs, on_epoch_end=on_epoch_end, tag=tag,
                                         vmap_width=vmap_width, allow_config_change=allow_config_change)
    return outcomes, timings


def _train_trials(configs, workdirs, *, on_epoch_end=None, tag=None, vmap_width=None,
                  allow_config_change=False):
    t_start = time.perf_counter()
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("train_trials needs one workdir per config, and at least one config.")
    resolved = [resolve(c) for c in configs]
    for k, wd in enumerate(workdirs):  # a run recorded before a field existed resumes as it computed
        resolved[k], legacy = rundir.with_legacy_values(wd, resolved[k])
        for key, value in legacy.items():
            say(f"{tag_of(k, len(configs))}{key}={value!r}: {wd} was recorded before this field "
                "existed and resumes as it computed.")
    if len(configs) > 1 and len({pack_key(c) for c in resolved}) != 1:
        raise NotPackable("The configs differ in fields that cannot be traced in one program.")
    exp = build_experiment(resolved[0], folds=[c.data.fold for c in resolved])
    per_epoch = {c.data.fold: len(exp.dataset_for(c).train) // exp.config.batch_size for c in resolved}
    if len(set(per_epoch.values())) > 1:  # unreadable images left the folds' training splits unequal
        raise NotPackable(f"The validation folds train {per_epoch} steps per epoch (fold: steps); "
                          "they cannot share one program.")
    exp.loss_inputs()  # a loss's setup (e.g. loading a teacher) refuses a bad config before any record
    config = exp.config
    K = len(configs)
    tag = tag or ((lambda k: "") if K == 1 else (lambda k: f"[{k}] "))
    ckpts = [Checkpoints(wd, keep=config.checkpoint.keep, best_metric=config.checkpoint.best_metric,
                         best_mode=config.checkpoint.best_mode) for wd in workdirs]
    starts = [c.latest_step() or 0 for c in ckpts]
    # Fine-tuning's patterns and source refuse a bad config before any record.
    source = finetune.check(exp, fresh=0 in starts)
    for c, wd, start in zip(resolved, workdirs, starts):
        if is_main_process():
            _record_run(wd, c, exp, step=start, allow_config_change=allow_config_change)
        else:  # refuse a changed config in every process, not only in the one that writes
            rundir.record_config(wd, c.to_dict(), step=start, allow_config_change=allow_config_change,
                                 check_only=True)
    outcomes = [TrialOutcome(metrics={}) for _ in range(K)]
    timings = {"setup": time.perf_counter() - t_start, "first_step": 0.0, "steps": 0.0, "eval": 0.0,
               "save": 0.0}
    total_steps = config.num_epochs * exp.steps_per_epoch
    states = None
    try:
        for k in [k for k in range(K) if starts[k] >= total_steps]:  # finished: evaluate as is
            say(f"{tag(k)}{workdirs[k]} is complete ({config.num_epochs} epochs, step {starts[k]}): "
                "nothing to train; evaluating its latest checkpoint (a new run needs a new "
                "--workdir, more epochs --config.num_epochs=N --allow_config_change).")
            outcomes[k].metrics = evaluate(None, workdirs[k], which="latest",
                                           exp=exp.for_config(resolved[k]), overwrite=True)
        for start in sorted({s for s in starts if s < total_steps}):
            group = [k for k in range(K) if starts[k] == start]
            pick = lambda items, g=group: [items[k] for k in g]  # noqa: E731
            states = _run_group(
                exp.for_config(resolved[group[0]]), pick(resolved), pick(workdirs), pick(ckpts),
                pick(outcomes), start, tag=lambda i, g=group: tag(g[i]), vmap_width=vmap_width,
                on_epoch_end=on_epoch_end and (lambda i, e, r, g=group: on_epoch_end(g[i], e, r)),
                timings=timings, source=source)
    finally:
        for c in ckpts:
            c.close()
    for k, wd in enumerate(workdirs):
        if outcomes[k].error is None and is_main_process():
            report_lib.write_reports(wd, exp.dataset.class_names, overwrite=True)  # its own
    timings["total"] = time.perf_counter() - t_start
    return outcomes, states, timings


def tag_of(k: int, num_trials: int) -> str:
    """``"[k] "`` before a packed trial's lines; nothing for a single run."""
    return "" if num_trials == 1 else f"[{k}] "


def _record_run(workdir: str, config, exp: Experiment, *, step: int, allow_config_change: bool) -> None:
    """The run directory's records: config (refusing an unannounced change on resume), classes,
    extensions, preprocessing, split and environment."""
    dataset = exp.dataset_for(config)  # its own validation fold's
    os.makedirs(workdir, exist_ok=True)
    rundir.record_config(workdir, config.to_dict(), step=step, allow_config_change=allow_config_change)
    write_json_atomic(os.path.join(workdir, runfiles.CLASSES), list(dataset.class_names))
    write_json_atomic(os.path.join(workdir, EXTENSIONS_FILE), extension_modules(config))
    write_json_atomic(os.path.join(workdir, PREPROCESSING_FILE), exp.normalization)
    if step:
        rundir.check_split(workdir, dataset)
    rundir.write_split_record(workdir, dataset)
    rundir.write_environment(workdir)


def _run_group(exp: Experiment, configs, workdirs, ckpts, outcomes, start_step, *, on_epoch_end, tag,
               vmap_width, timings, source=None) -> Any:
    """The loop: trains the trials of one group from ``start_step`` to the end (or until every
    trial has stopped); fills ``outcomes`` and returns the final states. A fresh group starts
    from ``source``'s variables where given (``config.init_from``, :mod:`cnnlab.train.finetune`)."""
    config = exp.config
    K = len(configs)
    t0 = time.perf_counter()
    datasets = [exp.dataset_for(c) for c in configs]  # each trial's own (its validation fold)
    for wd in workdirs:  # a resume compiles the formulations its run chose
        rundir.pin_formulations(wd)
    prog = build_program(exp, configs, vmap_width=vmap_width)
    states = prog.init()
    if start_step:
        states = prog.stack([c.restore(s)[0] for c, s in zip(ckpts, prog.trials(states))])
        say(f"Resuming {'' if K == 1 else f'{K} packed trials '}from step {start_step} "
            f"({ckpts[0].latest.directory if K == 1 else 'their checkpoints'}).")
    elif source is not None:
        states, record = finetune.initialize(exp, prog, states, source)
        say(finetune.summary(record))
        if is_main_process():
            for wd in workdirs:
                write_json_atomic(os.path.join(wd, runfiles.INIT_FROM), record)
    writers = [MetricWriter(wd, resume_step=start_step, enabled=is_main_process()) for wd in workdirs]
    if start_step == 0 and is_main_process():
        for k, grid in enumerate(_augmented_grids(exp, configs, datasets)):
            writers[k].write_image("augmented_batch", grid, 0)
    total_steps = config.num_epochs * exp.steps_per_epoch
    varying = sorted(varying_fields(configs)) + [name for name, values in
                                                  (("seed", prog.seeds), ("data.fold", prog.folds))
                                                  if len(set(values)) > 1]
    say(
        f"Training {f'{K} packed trials of ' if K > 1 else ''}{config.model.name} on "
        f"{len(exp.dataset.train.labels)} images{_fold_note(configs)} ({exp.num_classes} classes), {config.num_epochs} "
        f"epochs x {exp.steps_per_epoch} steps, batch {config.batch_size}, "
        + (f"varying {varying}, {prog.vmap_width} vmapped side by side, " if K > 1 else "")
        + f"{len(exp.mesh.devices.flat)} device(s) in {jax.process_count()} process(es) "
        f"[{jax.devices()[0].platform}]."
    )
    active = [True] * K
    timings["setup"] += time.perf_counter() - t0

    def save_latest(step: int, only: int | None = None) -> None:
        t = time.perf_counter()
        with _finish_before_interrupt(f"the checkpoint of step {step}"):
            for k, state in enumerate(prog.trials(states)):
                if active[k] if only is None else k == only:
                    if is_main_process():  # first: the checkpoint must not outlive the record
                        rundir.record_formulations(workdirs[k])
                    ckpts[k].save_latest(step, state)
        timings["save"] += time.perf_counter() - t

    def check_finite() -> None:
        bad = np.atleast_1d(jax.device_get(states.nonfinite_step))
        for k in range(K):
            if active[k] and bad[k] >= 0:
                last = ckpts[k].latest_step()
                outcomes[k].error = NonFiniteLossError(
                    f"Non-finite training loss at step {int(bad[k])}; stopping. "
                    + (f"The last good checkpoint (step {last}) is kept in {ckpts[k].latest.directory}."
                       if last is not None else "(No checkpoint was written yet.)"))
                active[k] = False
                say(f"{tag(k)}stopped: {outcomes[k].error}")

    def end_of_epoch(epoch: int, step: int) -> None:
        check_finite()
        sums = jax.device_get(states.epoch_sums)
        records = [train_record(epoch, prog.take(sums, k)) for k in range(K)]
        if epoch % config.eval_every_epochs == 0 or epoch == config.num_epochs:
            t = time.perf_counter()
            results = evaluate_with_ema(exp, prog, states, datasets)
            timings["eval"] += time.perf_counter() - t
            t = time.perf_counter()
            for k, state in enumerate(prog.trials(states)):
                if not active[k]:
                    continue
                records[k].update(_flat(results[k]))
                writers[k].write("epoch", step, records[k])
                ckpts[k].save_best(step, state, records[k])
                if is_main_process():
                    np.save(os.path.join(workdirs[k], runfiles.CONFUSION_LAST), results[k]["test"]["confusion"])
            timings["save"] += time.perf_counter() - t
        for w in writers:  # TensorBoard's buffer: a kill loses at most this epoch's points
            w.flush()
        for k in range(K):
            if active[k]:
                summary = "  ".join(f"{m}={v:.4f}" for m, v in records[k].items()
                                    if m != "epoch" and isinstance(v, float))
                if is_main_process():
                    bar.write(f"{tag(k)}epoch {epoch:3d}/{config.num_epochs}  {summary}")
                outcomes[k].metrics = records[k]

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (config.progress and is_main_process()),
               desc="train" if K == 1 else f"train x{K}", unit="step", dynamic_ncols=True, leave=False)
    kill_at = int(os.environ.get(_FAULT_KILL_AT_STEP, "-1"))
    step, first = start_step, True
    t_window, n_window, t_train = time.perf_counter(), 0, time.perf_counter()
    stream = _host_chunks(exp, prog, start_step, datasets)
    try:
        for chunk in data_lib.prefetch_to_device(stream, 2, prog.chunk_sharding):
            n = chunk["label"].shape[0]
            t = time.perf_counter()
            if n == 1:
                states, metrics = prog.train_step(states, prog.h, jax.tree_util.tree_map(lambda a: a[0], chunk))
            else:
                states, metrics = prog.train_chunk(states, prog.h, chunk)
                metrics = jax.tree_util.tree_map(lambda a: a[-1], metrics)
            if first:
                jax.block_until_ready(states.step)
                timings["first_step"] = time.perf_counter() - t
                first = False
            previous, step = step, step + n
            n_window += n * config.batch_size
            bar.update(n)
            epoch, step_in_epoch = divmod(step, exp.steps_per_epoch)
            if _crossed(previous, step, config.log_every_steps):
                metrics = jax.device_get(metrics)
                check_finite()
                rate = n_window / max(time.perf_counter() - t_window, 1e-9)
                t_window, n_window = time.perf_counter(), 0
                for k in range(K):
                    if active[k]:
                        writers[k].write("train", step, {
                            **step_record(prog.take(metrics, k)), "images_per_sec": rate,
                            "learning_rate": learning_rate_at(configs[k], exp.steps_per_epoch, step - 1)})
                if K == 1:
                    bar.set_postfix(epoch=epoch + (step_in_epoch > 0), loss=f"{float(metrics['loss']):.3f}",
                                    acc=f"{float(metrics['accuracy']):.3f}", img_s=f"{rate:.0f}")
            if step_in_epoch and _crossed(previous, step, config.checkpoint.every_steps):
                check_finite()
                save_latest(step)
            if step_in_epoch == 0:
                timings["steps"] += time.perf_counter() - t_train
                # A Ctrl-C from here waits for the epoch's records and checkpoint: a resume
                # then starts after this epoch, and no orbax save is cut short.
                with _finish_before_interrupt(f"epoch {epoch}'s evaluation and checkpoint"):
                    end_of_epoch(epoch, step)
                    states = prog.reset_sums(states)
                    if epoch % config.checkpoint.every_epochs == 0 or step == total_steps:
                        save_latest(step)
                for k in range(K):
                    if active[k] and on_epoch_end is not None:
                        try:
                            on_epoch_end(k, epoch, outcomes[k].metrics)
                        except StopTraining:
                            save_latest(step, only=k)
                            outcomes[k].pruned, active[k] = True, False
                t_train = time.perf_counter()
            if not any(active):
                break
            if previous < kill_at <= step:
                os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        last = ckpts[0].latest_step()
        raise TrainingInterrupted(
            f"interrupted at step {step} of {total_steps}; "
            + (f"the last checkpoint is step {last}. Run the same command again to resume from it."
               if last is not None else "no checkpoint was written yet; the same command starts over.")
        ) from None
    finally:
        bar.close()
        for w in writers:
            w.close()
    check_finite()
    timings["steps"] -= timings["first_step"]
    for o in outcomes:
        o.metrics = {m: v for m, v in o.metrics.items() if m != "confusion"}
    return states


def _fold_note(configs) -> str:
    folds = sorted({c.data.fold for c in configs})
    if not configs[0].data.folds:
        return ""
    return f" (validation fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))} of {configs[0].data.folds})"


def _augmented_grids(exp: Experiment, configs, datasets) -> list[np.ndarray]:
    """Per trial, a grid of the first 16 images of its first training batch after its
    augmentation pipeline (with a fixed key): what the model is shown."""
    grids = {}
    keys = [(c.seed, c.data.fold, str(c.data.augment)) for c in configs]
    for c, key, dataset in zip(configs, keys, datasets, strict=True):
        if key not in grids:
            train = dataset.train
            batch = next(data_lib.iterate_train(train.images, train.labels, c.batch_size, seed=c.seed))
            pipeline = data_lib.augment_pipeline(c.data.augment, exp.num_classes)
            images, _ = pipeline(jax.random.PRNGKey(0), batch["image"][:16], batch["label"][:16])
            grids[key] = image_grid(jax.device_get(images))
    return [grids[key] for key in keys]


def _host_chunks(exp: Experiment, prog: Program, start_step: int, datasets: Sequence[Any]):
    """This process's rows of the training stream in chunks of ``steps_per_dispatch`` batches:
    ``[S, B, ...]`` (one data order) or ``[S, K, B, ...]`` (each trial its own seed's order of
    its own training images); a chunk never crosses an epoch boundary."""
    config = exp.config
    rows = process_slice(config.batch_size)
    streams = [
        data_lib.iterate_train(datasets[k].train.images, datasets[k].train.labels, config.batch_size,
                               seed=prog.seeds[k], start_step=start_step, num_epochs=config.num_epochs)
        for k in range(1 if prog.shared else prog.size)
    ]
    step, pending = start_step, []
    for batches in zip(*streams):
        local = [{k: v[rows] for k, v in b.items()} for b in batches]
        pending.append(local[0] if prog.shared else {k: np.stack([b[k] for b in local]) for k in local[0]})
        step += 1
        if len(pending) == config.steps_per_dispatch or step % exp.steps_per_epoch == 0:
            yield {k: np.stack([b[k] for b in pending]) for k in pending[0]}
            pending = []


# ---------------------------------------------------------------------------------------------
# Re-evaluation of a finished (or interrupted) run
# ---------------------------------------------------------------------------------------------


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    *,
    which: str = "best",
    exp: Experiment | None = None,
    output_dir: str | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluates the ``best`` (by ``checkpoint.best_metric``, a validation metric by default) or
    ``latest`` checkpoint of ``workdir`` on every eval split and writes ``eval_<which>.json`` and
    ``confusion_<split>_<which>.npy`` to ``output_dir`` (default ``workdir``; skipped with a note
    when that is not writable, so a read-only run can be evaluated); returns the metrics.

    ``data_dir``: where the run's images are now, when ``exp`` is None (a folder-source run's,
    moved since; default: the recorded ``data.data_dir``, else ``$CALTECH101_DIR``; see
    :func:`_locate_data`). Refuses when the data no longer gives the recorded val or test split;
    a change in the training split alone is a one-line warning (and the run's recorded
    normalization is used). Raises :class:`~cnnlab.train.report.OutputExistsError` before
    evaluating when an output file exists, unless ``overwrite``."""
    if exp is None:
        config = config if config is not None else load_run_config(workdir)
        exp = build_experiment(_locate_data(config, data_dir))
    splits = list(eval_splits(exp))
    changed = rundir.check_split(workdir, exp.dataset, used=splits)
    if changed and is_main_process():
        print(f"warning: {changed}: evaluating them.", file=sys.stderr, flush=True)
    recorded = _recorded_normalization(workdir)
    if recorded is not None and recorded != exp.normalization:  # the training images changed
        exp = dataclasses.replace(exp, normalize=make_normalize(recorded), normalization=recorded)
    ckpt = Checkpoints(workdir, keep=exp.config.checkpoint.keep, best_metric=exp.config.checkpoint.best_metric,
                       best_mode=exp.config.checkpoint.best_mode)
    try:
        if which == "best" and ckpt.best.latest_step() is None:
            which = "latest"
        target = report_lib.output_dir_for(workdir, output_dir) if is_main_process() else None
        if target is not None:
            names = [runfiles.eval_record(which)] + [runfiles.eval_confusion(s, which) for s in splits]
            report_lib.refuse_existing(target, names, overwrite=overwrite)
        state, step = ckpt.restore(initial_state(exp), which=which)
    finally:
        ckpt.close()
    prog = build_program(exp, [exp.config])
    results = evaluate_with_ema(exp, prog, state)[0]
    out: dict[str, Any] = {"checkpoint": which, "step": step, **_flat(results)}
    if target is not None:
        for name, res in results.items():
            np.save(os.path.join(target, runfiles.eval_confusion(name, which)), res["confusion"])
        write_json_atomic(os.path.join(target, runfiles.eval_record(which)), out)
    return out


def _locate_data(config: ml_collections.ConfigDict, data_dir: str | None) -> ml_collections.ConfigDict:
    """The run's recorded config with its images where they are now: ``data_dir`` when given;
    else the recorded ``data.data_dir`` while it exists; else ``$CALTECH101_DIR``, as training
    reads it for an unset one. (``data.data_dir`` does not change results, and the split check
    refuses other images.)"""
    env = data_lib.ENV_DATA_DIR
    if config.data.source != "folder":
        if data_dir is not None:
            raise ValueError(f"--data_dir={data_dir!r}: this run reads no data directory (its "
                             f"data.source is {config.data.source!r}, not 'folder')")
        return config
    recorded = config.data.get("data_dir")
    if data_dir is None and recorded and not os.path.exists(os.path.expanduser(recorded)):
        data_dir = os.environ.get(env)
        if not data_dir:
            raise FileNotFoundError(f"the run's data.data_dir {recorded} does not exist (moved?): "
                                    f"point --data_dir=DIR (or ${env}) at where its images are now")
        if is_main_process():
            print(f"note: the run's data.data_dir {recorded} does not exist; reading ${env}={data_dir}",
                  file=sys.stderr, flush=True)
    elif data_dir is None and not recorded and not os.environ.get(env):
        raise FileNotFoundError(f"the run read its images from ${env}, which is not set: set it or "
                                "pass --data_dir=DIR")
    if data_dir is None:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.data_dir = str(data_dir)
    return config


def _recorded_normalization(workdir: str) -> dict[str, Any] | None:
    """The normalization the run trained with (``preprocessing.json``; None for older runs)."""
    try:
        with open(os.path.join(workdir, PREPROCESSING_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
