"""A sweep's Optuna study: storage, slots, who owns a trial, and recovery of interrupted ones.

How a sweep lives in its study (SQLite ``<workdir>/study.db`` by default, or any SQLAlchemy URL
such as ``postgresql://user@host/db`` shared by workers on many machines):

* **Slots.** The sweep's ``N`` trials are enqueued once, when the study is created, as
  ``WAITING`` Optuna trials tagged ``cnnlab.slot = i`` (grid point ``i``; random draw ``i``,
  sampled up front from ``(seed, i)``; or an empty slot that TPE fills when it is claimed).
  Grid points are enqueued grouped by :func:`~cnnlab.train.pack_key`, so consecutive
  claims can be packed.
* **Claiming** (:mod:`cnnlab.sweep.worker`) moves a ``WAITING`` trial to ``RUNNING`` under the
  storage's row lock (PostgreSQL: ``SELECT ... FOR UPDATE``; SQLite: every transaction here is
  ``BEGIN IMMEDIATE``), so each trial is claimed once. A claim whose slot already has a
  finished trial, or a live trial with a lower number (two workers that created the study at
  once may both enqueue), is dropped as a duplicate (:func:`duplicate_of`).
* **Interruptions.** A running trial records a heartbeat; one whose worker is gone (heartbeat
  older than ``grace_period``, or, on the same machine, a worker process that no longer exists,
  detected at once) is marked ``FAIL`` and re-enqueued for its slot (up to ``max_retry``
  times). Finished trials are never run again.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import socket
import sys
import threading
import time
from typing import Any

import ml_collections
from absl import logging

from cnnlab.sweep import space as space_lib
from cnnlab.sweep._optuna_adapter import load as load_optuna
from cnnlab.sweep._optuna_adapter import trial_id
from cnnlab.sweep.space import Sweep, apply_point

# User attributes of the trials (all prefixed, to leave the user's own alone).
SLOT = "cnnlab.slot"
OWNER = "cnnlab.owner"
WORKDIR = "cnnlab.workdir"
VALUES = "cnnlab.values"
METRICS = "cnnlab.metrics"
ERROR = "cnnlab.error"
DUPLICATE = "cnnlab.duplicate_of"
PACKED = "cnnlab.pack_size"
DURATION = "cnnlab.duration_s"
TIMINGS = "cnnlab.timings"
FOLD_VALUES = "cnnlab.fold_values"
# Study user attributes.
FINGERPRINT = "cnnlab.fingerprint"
READY = "cnnlab.ready"

DEFAULT_STUDY = "sweep"
SWEEP_JSON = "sweep.json"


def log(message: str) -> None:
    """A ``[sweep]`` line on stdout, flushed at once (several workers may share a terminal)."""
    print(f"[sweep] {message}", flush=True)


# --- Storage --------------------------------------------------------------------------------------


def default_storage(workdir: str) -> str:
    """``sqlite:///<workdir>/study.db``."""
    return f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"


def masked_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """Where the study lives and how interruptions are detected."""

    url: str
    study_name: str = DEFAULT_STUDY
    heartbeat_interval: int = 10
    grace_period: int = 60
    max_retry: int | None = 3


def _serialize_sqlite(engine) -> None:
    """Makes every SQLite transaction ``BEGIN IMMEDIATE``: pysqlite's default defers the lock to
    the first write, which lets two workers both read a trial as ``WAITING`` and claim it."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        dbapi_connection.execute("PRAGMA busy_timeout = 120000")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while creating the tables predate the hooks


def make_storage(options: StorageOptions):
    """An Optuna ``RDBStorage`` with heartbeats, stale-trial retry and serialized SQLite."""
    optuna = load_optuna()
    sqlite = options.url.startswith("sqlite")
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 120}}} if sqlite else {}
    if sqlite:
        path = options.url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(
                options.url, heartbeat_interval=options.heartbeat_interval,
                grace_period=options.grace_period, **kwargs,
                heartbeat_stale_trial_callback=lambda study, trial: retry_trial(
                    study, trial, max_retry=options.max_retry))
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Workers on several machines started at once race to create Optuna's schema
            # (PostgreSQL: duplicate type/table). The loser waits and opens the finished schema.
            if attempt == 5:
                raise
            logging.info("storage schema being created by another worker (%s); retrying",
                         type(e.__cause__ or e).__name__)
            time.sleep(0.5 + random.random())
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


# --- Who runs a trial -----------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_owner() -> dict[str, Any]:
    """This process's identity: host, boot, pid and process start time (pids are reused)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _start_ticks(pid)}


def owner_is_dead(owner: dict[str, Any]) -> bool:
    """Whether ``owner`` is a process of this machine that no longer runs (``False`` when it is
    elsewhere: the heartbeat decides then)."""
    me = this_owner()
    if owner.get("host") != me["host"] or owner.get("boot") != me["boot"]:
        return False
    pid = int(owner.get("pid", -1))
    if pid == me["pid"]:
        return owner.get("start") != me["start"]
    start = _start_ticks(pid)
    if start is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return owner.get("start") is not None and sys.platform.startswith("linux")
    return start != owner.get("start")


class Heartbeat:
    """Records a heartbeat for every trial this worker holds, every ``interval`` seconds."""

    def __init__(self, storage, interval: int) -> None:
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cnnlab-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial) -> None:
        self.storage.record_heartbeat(trial_id(trial))
        with self._lock:
            self.trial_ids.add(trial_id(trial))

    def remove(self, trial) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id(trial))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for tid in ids:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception as e:  # noqa: BLE001 - a missed beat is retried next interval
                    print(f"[sweep] heartbeat failed: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- Slots ----------------------------------------------------------------------------------------


def _sampler(sweep: Sweep, salt: int):
    optuna = load_optuna()
    if sweep.kind == "tpe":
        kwargs = {"constant_liar": True, "seed": sweep.seed + salt, **dict(sweep.sampler_kwargs)}
        return optuna.samplers.TPESampler(**kwargs)
    return optuna.samplers.RandomSampler(seed=sweep.seed + salt)


_PRUNERS = {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
            "hyperband": "HyperbandPruner"}


def _pruner(sweep: Sweep):
    pruners = load_optuna().pruners
    if sweep.pruner not in _PRUNERS:
        return pruners.NopPruner()
    return getattr(pruners, _PRUNERS[sweep.pruner])(**dict(sweep.pruner_kwargs))


def _slot_params(sweep: Sweep, base: ml_collections.ConfigDict, slot: int) -> dict[str, Any]:
    if sweep.kind == "grid":
        return space_lib.grid_params(sweep, base, slot)
    if sweep.kind == "random":
        return space_lib.sample_random(sweep, slot)
    return {}


def _enqueue_order(sweep: Sweep, base: ml_collections.ConfigDict) -> list[int]:
    """Slots in enqueue order: grid points grouped by pack key (stable), so that consecutive
    claims can share a program."""
    if sweep.kind != "grid":
        return list(range(sweep.num_slots))
    from cnnlab.train import pack_key

    keys = [pack_key(apply_point(base, p)) or f"~{i}" for i, p in enumerate(sweep.grid)]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    return sorted(range(len(keys)), key=lambda i: (first[keys[i]], i))


def open_study(base: ml_collections.ConfigDict, sweep: Sweep, options: StorageOptions, *,
               salt: int = 0, ready_timeout: float = 60.0):
    """Creates the study and enqueues the slots, or loads it (checking that it was made by the
    same sweep). Returns ``(study, storage)``."""
    optuna = load_optuna()
    storage = make_storage(options)
    direction = "maximize" if sweep.mode == "max" else "minimize"
    fp = space_lib.fingerprint(base, sweep)
    try:
        study = optuna.create_study(storage=storage, study_name=options.study_name, direction=direction,
                                    sampler=_sampler(sweep, salt), pruner=_pruner(sweep))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=options.study_name, storage=storage,
                                  sampler=_sampler(sweep, salt + 1 + os.getpid()), pruner=_pruner(sweep))
        deadline = time.monotonic() + ready_timeout
        while True:
            attrs = study.user_attrs
            if attrs.get(FINGERPRINT) not in (None, fp):
                raise ValueError(
                    f"Study {options.study_name!r} in {masked_url(options.url)} was created by a "
                    f"different sweep or base config (fingerprint {attrs[FINGERPRINT]}, this one {fp}). "
                    "Use a new --workdir (or --study_name), or run the original command."
                ) from None
            if attrs.get(READY) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    if not study.user_attrs.get(READY):  # a new study, or its creator died while enqueueing
        study.set_user_attr(FINGERPRINT, fp)
        ensure_slots(study, sweep, base, max_retry=None)
        study.set_user_attr(READY, True)
    return study, storage


def _done(trial) -> bool:
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (state == "FAIL" and ERROR in trial.user_attrs)


def is_live(trial) -> bool:
    return trial.state.name in ("RUNNING", "WAITING")


def trials_by_slot(study) -> dict[int, list]:
    """Each slot's trials in trial order, dropped duplicates left out."""
    by_slot: dict[int, list] = {}
    for t in study.get_trials(deepcopy=False):
        if SLOT in t.user_attrs and DUPLICATE not in t.user_attrs:
            by_slot.setdefault(int(t.user_attrs[SLOT]), []).append(t)
    return by_slot


def duplicate_of(study, trial_number: int, slot: int) -> int | None:
    """The number of another trial that already holds ``slot`` (finished, or live with a lower
    number), or ``None``: then trial ``trial_number`` is the slot's one."""
    for u in study.get_trials(deepcopy=False):
        if u.number != trial_number and u.user_attrs.get(SLOT) == slot and (
                _done(u) or (is_live(u) and u.number < trial_number)):
            return u.number
    return None


def retry_trial(study, trial, *, max_retry: int | None) -> bool:
    """Enqueues a copy of an interrupted ``trial`` for its slot (params kept, so a TPE trial
    resumes with the values it had); ``False`` past ``max_retry``."""
    optuna = load_optuna()
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if max_retry is not None and len(history) > max_retry:
        log(f"trial {trial.number} (slot {trial.user_attrs.get(SLOT)}) was interrupted "
            f"{len(history)} times; not retried again.")
        return False
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k == "fixed_params"}
    system_attrs.update(failed_trial=history[0], retry_history=history)
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k in (SLOT, WORKDIR, VALUES)}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs, system_attrs=system_attrs,
    ))
    return True


def ensure_slots(study, sweep: Sweep, base, *, max_retry: int | None) -> int:
    """Enqueues every slot that has no finished or live trial (a retry that was never
    enqueued, a creator that died); returns how many."""
    by_slot = trials_by_slot(study)
    added = 0
    for slot in _enqueue_order(sweep, base):
        ts = by_slot.get(slot, [])
        if any(_done(t) or is_live(t) for t in ts):
            continue
        if ts:  # the last try was interrupted
            added += retry_trial(study, ts[-1], max_retry=max_retry)
        else:
            study.enqueue_trial(_slot_params(sweep, base, slot), user_attrs={SLOT: slot})
            added += 1
    return added


def recover_interrupted(study, storage, *, max_retry: int | None, grace_period: int) -> None:
    """Fails and re-enqueues trials whose worker is gone: heartbeat-stale ones (any machine) and
    ones owned by a dead process of this machine (at once)."""
    optuna = load_optuna()
    TrialState = optuna.trial.TrialState
    optuna.storages.fail_stale_trials(study)
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER)
        orphan = owner is None and t.datetime_start is not None and (
            now - t.datetime_start.timestamp() > 2 * grace_period)
        if not (orphan or (owner is not None and owner_is_dead(owner))):
            continue
        try:
            if not storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        log(f"trial {t.number} (slot {t.user_attrs.get(SLOT)}) was interrupted "
            f"(worker {owner.get('pid') if owner else '?'} is gone); re-enqueued.")
        retry_trial(study, copy.deepcopy(storage.get_trial(trial_id(t))), max_retry=max_retry)

