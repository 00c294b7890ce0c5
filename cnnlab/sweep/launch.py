"""``run_sweep``: validates a sweep, opens its study, runs one worker here or ``workers`` worker
processes, and writes the report."""

from __future__ import annotations

import collections
import os
import sys
import time
from typing import Any

import ml_collections

from cnnlab.sweep import space as space_lib
from cnnlab.sweep import study as study_lib
from cnnlab.sweep.report import write_report
from cnnlab.sweep.space import Sweep, copy_config, validate_sweep
from cnnlab.sweep.study import DEFAULT_STUDY, DUPLICATE, StorageOptions, log, masked_url
from cnnlab.sweep.worker import Worker
from cnnlab.train.writers import write_json_atomic


def run_sweep(
    base: ml_collections.ConfigDict,
    sweep: Sweep,
    workdir: str,
    *,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    workers: int = 1,
    pack: int | None = None,
    heartbeat_interval: int = 10,
    grace_period: int = 60,
    max_retry: int | None = 3,
    poll_interval: float = 2.0,
    vmap_width: int | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Runs (or resumes) ``sweep`` over ``base`` in ``workdir``; returns the report's summary
    (``{}`` with ``report=False``).

    Args:
        base: the base training config (a sweep file's ``get_config()``).
        sweep: the search space (its ``get_sweep()``); validated with :func:`validate_sweep`
            before anything runs.
        workdir: holds ``study.db`` (unless ``storage`` is given), ``sweep.json``, ``trials/``
            and the report.
        storage: an SQLAlchemy URL (``postgresql://user@host:5432/db``) to share the study
            (named ``study_name``) with workers on other machines running the same command.
        workers: local worker processes (each claims trials from the same study).
        pack: trials trained together in one program (default ``sweep.pack``).
        heartbeat_interval, grace_period: seconds; a running trial without a heartbeat for
            ``grace_period`` is considered interrupted and retried (at most ``max_retry`` times).
        poll_interval: seconds between checks while other workers hold the last trials.
        vmap_width: packed trials computed side by side by ``jax.vmap`` (the others loop in
            the same program); default: all on GPU/TPU, 1 on CPU (see ``cnnlab.train.packing.over_trials``).
    """
    base = copy_config(base)
    validate_sweep(sweep, base)
    os.makedirs(workdir, exist_ok=True)
    options = StorageOptions(url=storage or study_lib.default_storage(workdir), study_name=study_name,
                             heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                             max_retry=max_retry)
    pack = sweep.pack if pack is None else int(pack)
    write_json_atomic(os.path.join(workdir, study_lib.SWEEP_JSON), {
        "sweep": sweep.to_dict(), "fields": sweep.fields(), "base_config": base.to_dict(),
        "fingerprint": space_lib.fingerprint(base, sweep), "storage": masked_url(options.url),
        "study_name": options.study_name,
    })
    log(f"{sweep.kind} sweep of {sweep.num_slots} trials over {sweep.fields()} -> {workdir} "
        f"(study {study_name!r} in {masked_url(options.url)}; {workers} worker(s), pack {pack}).")
    t0 = time.perf_counter()
    worker_kwargs = {"pack": pack, "poll_interval": poll_interval, "vmap_width": vmap_width}
    if workers <= 1:
        Worker(base, sweep, workdir, options, **worker_kwargs).run()
    else:
        _run_workers(base, sweep, workdir, options, workers, worker_kwargs)
    log(f"done in {time.perf_counter() - t0:.1f} s.")
    return write_report(workdir, storage=storage, study_name=study_name) if report else {}


def _worker_main(base_dict: dict, sweep: Sweep, workdir: str, options: StorageOptions,
                 worker_kwargs: dict[str, Any], log_path: str) -> None:
    """A ``--workers`` child: the command's process settings, output to its log file, then the
    worker loop."""
    from cnnlab import runtime

    runtime.configure()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    Worker(ml_collections.ConfigDict(base_dict), sweep, workdir, options, **worker_kwargs).run()


def _run_workers(base, sweep, workdir, options, workers: int, worker_kwargs: dict[str, Any]) -> None:
    import multiprocessing

    from optuna.trial import TrialState

    study, _ = study_lib.open_study(base, sweep, options)  # create and enqueue once, before the workers
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, name=f"cnnlab-sweep-worker-{i}",
                         args=(base.to_dict(), sweep, workdir, options, {**worker_kwargs, "salt": i},
                               os.path.join(logs, f"worker-{i}.log"))) for i in range(workers)]
    for p in procs:
        p.start()
    log(f"started {workers} workers (logs in {logs}).")
    last = None
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(min(worker_kwargs["poll_interval"], 2.0))
            counts = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False)
                                         if DUPLICATE not in t.user_attrs)
            if counts != last:
                log(", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())))
                last = counts
    finally:
        for p in procs:
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        log(f"{len(bad)} worker(s) exited with codes {bad}; see {logs}.")
    left = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    if left:
        raise RuntimeError(f"Trials {left} are still waiting; run the command again to finish them.")
