"""Running a sweep on Optuna: one study, trials claimed exactly once, resumable, many workers.

How a sweep lives in its study (SQLite ``<workdir>/study.db`` by default, or any SQLAlchemy URL
such as ``postgresql://user@host/db`` shared by workers on many machines):

* **Slots.** The sweep's ``N`` trials are enqueued once, when the study is created, as
  ``WAITING`` Optuna trials tagged ``cnnlab.slot = i`` (grid point ``i``; random draw ``i``,
  sampled up front from ``(seed, i)``; or an empty slot that TPE fills when it is claimed).
  Grid points are enqueued grouped by :func:`~cnnlab.train.group.pack_key`, so consecutive
  claims can be packed.
* **Claiming.** A worker pops ``WAITING`` trials through Optuna's storage, which moves each from
  ``WAITING`` to ``RUNNING`` under a row lock (PostgreSQL: ``SELECT ... FOR UPDATE``; SQLite:
  every transaction here is ``BEGIN IMMEDIATE``), so each trial is claimed by one worker. A claim
  whose slot already has a finished trial, or a live trial with a lower number (two workers that
  created the study at the same moment may both enqueue), is dropped as a duplicate.
* **Trial directories.** Slot ``i`` trains in ``<workdir>/trials/<i:04d>``, a normal run
  directory (``config.json``, ``config.py``, metrics, checkpoints, reports), so a retried slot
  resumes from its own checkpoint and any trial can be inspected or resumed with ``cnnlab train
  --config=<trial>/config.py --workdir=<trial>``.
* **Interruptions.** A running trial records a heartbeat (Optuna's ``heartbeat_interval``); one
  whose worker is gone (heartbeat older than ``grace_period``, or, on the same machine, a worker
  process that no longer exists, detected at once) is marked ``FAIL`` and re-enqueued for its
  slot (up to ``max_retry`` times). Finished trials are never run again.
* **Failures.** A trial that raises (NaN loss, a value the data or model rejects) is ``FAIL``
  with ``cnnlab.error`` set, and the sweep goes on.

The objective is the sweep's ``metric`` at a trial's last evaluation; it is reported to Optuna
after every evaluation, so pruners (median, successive halving, hyperband) can stop trials.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging

from cnnlab.sweep import space as space_lib
from cnnlab.sweep.files import write_config_file
from cnnlab.sweep.space import Sweep, apply_point, copy_config, validate_sweep
from cnnlab.train.writers import write_json_atomic

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
# Study user attributes.
FINGERPRINT = "cnnlab.fingerprint"
NUM_SLOTS = "cnnlab.num_slots"
READY = "cnnlab.ready"

DEFAULT_STUDY = "sweep"
SWEEP_JSON = "sweep.json"
_FAULT_KILL_IN_SLOT = "CNNLAB_SWEEP_FAULT_KILL_IN_SLOT"  # "slot:step", for the resume test


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*fixed_params.*")
    return optuna


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def default_storage(workdir: str) -> str:
    """``sqlite:///<workdir>/study.db``."""
    return f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"


def _serialize_sqlite(engine) -> None:
    """Makes every SQLite transaction ``BEGIN IMMEDIATE`` (one writer at a time, taken at the
    start), so Optuna's read-check-write claim of a ``WAITING`` trial is atomic across processes;
    pysqlite's default defers the lock to the first write, which lets two workers both read
    ``WAITING``."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        dbapi_connection.execute("PRAGMA busy_timeout = 120000")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while creating the tables predate the hooks


def retry_trial(study, trial, *, max_retry: int | None) -> int | None:
    """Enqueues a copy of an interrupted ``trial`` for its slot (params kept, so a TPE trial
    resumes with the values it had); returns the retry's number or ``None`` past ``max_retry``."""
    optuna = _optuna()
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if max_retry is not None and len(history) > max_retry:
        print(f"[sweep] trial {trial.number} (slot {trial.user_attrs.get(SLOT)}) was interrupted "
              f"{len(history)} times; not retried again.", flush=True)
        return None
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k == "fixed_params"}
    system_attrs.update(failed_trial=history[0], retry_history=history)
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k in (SLOT, WORKDIR, VALUES)}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs, system_attrs=system_attrs,
    ))
    return len(study.get_trials(deepcopy=False)) - 1


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """Where the study lives and how interruptions are detected."""

    url: str
    study_name: str = DEFAULT_STUDY
    heartbeat_interval: int = 10
    grace_period: int = 60
    max_retry: int | None = 3


def make_storage(options: StorageOptions):
    """An Optuna ``RDBStorage`` with heartbeats, stale-trial retry and serialized SQLite."""
    optuna = _optuna()
    kwargs: dict[str, Any] = {}
    sqlite = options.url.startswith("sqlite")
    if sqlite:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        path = options.url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(
                options.url,
                heartbeat_interval=options.heartbeat_interval,
                grace_period=options.grace_period,
                heartbeat_stale_trial_callback=lambda study, trial: retry_trial(
                    study, trial, max_retry=options.max_retry),
                **kwargs,
            )
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


def _masked(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


# ---------------------------------------------------------------------------------------------
# Who runs a trial
# ---------------------------------------------------------------------------------------------


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


class _Heartbeat:
    """Records a heartbeat for every trial this worker holds, every ``interval`` seconds."""

    def __init__(self, storage, interval: int) -> None:
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cnnlab-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        with self._lock:
            self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a missed beat is retried next interval
                    print(f"[sweep] heartbeat failed: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def _sampler(sweep: Sweep, salt: int):
    optuna = _optuna()
    if sweep.kind == "tpe":
        kwargs = {"constant_liar": True, "seed": sweep.seed + salt, **dict(sweep.sampler_kwargs)}
        return optuna.samplers.TPESampler(**kwargs)
    return optuna.samplers.RandomSampler(seed=sweep.seed + salt)


def _pruner(sweep: Sweep):
    optuna = _optuna()
    kwargs = dict(sweep.pruner_kwargs)
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(**kwargs)
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kwargs)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**kwargs)
    return optuna.pruners.NopPruner()


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
    from cnnlab.train.group import pack_key

    keys = [pack_key(apply_point(base, p)) or f"~{i}" for i, p in enumerate(sweep.grid)]
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return sorted(range(len(keys)), key=lambda i: (first[keys[i]], i))


def open_study(
    base: ml_collections.ConfigDict,
    sweep: Sweep,
    options: StorageOptions,
    *,
    salt: int = 0,
    ready_timeout: float = 60.0,
):
    """Creates the study and enqueues the slots, or loads it (checking that it was made by the
    same sweep). Returns ``(study, storage, created)``."""
    optuna = _optuna()
    storage = make_storage(options)
    direction = "maximize" if sweep.mode == "max" else "minimize"
    fp = space_lib.fingerprint(base, sweep)
    try:
        study = optuna.create_study(storage=storage, study_name=options.study_name, direction=direction,
                                    sampler=_sampler(sweep, salt), pruner=_pruner(sweep))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=options.study_name, storage=storage,
                                  sampler=_sampler(sweep, salt + 1 + os.getpid()), pruner=_pruner(sweep))
        created = False
    if created:
        study.set_user_attr(FINGERPRINT, fp)
        study.set_user_attr(NUM_SLOTS, sweep.num_slots)
        for slot in _enqueue_order(sweep, base):
            study.enqueue_trial(_slot_params(sweep, base, slot), user_attrs={SLOT: slot})
        study.set_user_attr(READY, True)
        return study, storage, True
    deadline = time.monotonic() + ready_timeout
    while True:
        attrs = study.user_attrs
        if attrs.get(FINGERPRINT) not in (None, fp):
            raise ValueError(
                f"Study {options.study_name!r} in {_masked(options.url)} was created by a different "
                f"sweep or base config (fingerprint {attrs[FINGERPRINT]}, this one {fp}). Use a new "
                "--workdir (or --study_name), or run the original command."
            )
        if attrs.get(READY) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not attrs.get(READY):  # its creator died while enqueueing: fill in what is missing
        study.set_user_attr(FINGERPRINT, fp)
        _ensure_slots(study, sweep, base, max_retry=None)
        study.set_user_attr(READY, True)
    return study, storage, False


def _done(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and ERROR in trial.user_attrs
    )


def _live(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.RUNNING, TrialState.WAITING)


def _ensure_slots(study, sweep: Sweep, base, *, max_retry: int | None) -> int:
    """Enqueues every slot that has no finished or live trial (a retry that was never
    enqueued, a creator that died); returns how many."""
    trials = study.get_trials(deepcopy=False)
    by_slot: dict[int, list] = {}
    for t in trials:
        if SLOT in t.user_attrs:
            by_slot.setdefault(int(t.user_attrs[SLOT]), []).append(t)
    added = 0
    for slot in _enqueue_order(sweep, base):
        ts = by_slot.get(slot, [])
        if any(_done(t) or _live(t) for t in ts):
            continue
        interrupted = [t for t in ts if DUPLICATE not in t.user_attrs]
        if interrupted:
            if retry_trial(study, interrupted[-1], max_retry=max_retry) is not None:
                added += 1
        else:
            study.enqueue_trial(_slot_params(sweep, base, slot), user_attrs={SLOT: slot})
            added += 1
    return added


def _pop_waiting(study):
    """The next ``WAITING`` trial, moved to ``RUNNING`` by this worker alone; ``None`` if the
    queue is empty. (``study.ask()`` would create a new trial instead.)"""
    optuna = _optuna()
    cache = getattr(study, "_thread_local", None)
    if cache is not None and hasattr(cache, "cached_all_trials"):
        cache.cached_all_trials = None
    trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)


def recover_interrupted(study, storage, *, max_retry: int | None, grace_period: int) -> list[int]:
    """Fails and re-enqueues trials whose worker is gone: heartbeat-stale ones (any machine) and
    ones owned by a dead process of this machine (at once). Returns the failed trial numbers."""
    optuna = _optuna()
    from optuna.trial import TrialState

    failed = []
    optuna.storages.fail_stale_trials(study)
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER)
        orphan = owner is None and t.datetime_start is not None and (
            now - t.datetime_start.timestamp() > 2 * grace_period)
        if not (orphan or (owner is not None and owner_is_dead(owner))):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        failed.append(t.number)
        print(f"[sweep] trial {t.number} (slot {t.user_attrs.get(SLOT)}) was interrupted "
              f"(worker {owner.get('pid') if owner else '?'} is gone); re-enqueued.", flush=True)
        retry_trial(study, copy.deepcopy(storage.get_trial(t._trial_id)), max_retry=max_retry)
    return failed


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Claim:
    trial: Any
    slot: int
    values: dict[str, Any]
    config: ml_collections.ConfigDict
    workdir: str
    start: float


def _format_values(values: dict[str, Any]) -> str:
    def short(k):
        return k.split(".")[-1] if not k.startswith("model.kwargs") else k.split(".", 2)[-1]

    return ", ".join(f"{short(k)}={v:.3g}" if isinstance(v, float) else f"{short(k)}={v}"
                     for k, v in values.items())


class Worker:
    """Claims trials of one study and trains them (packed when possible) until none are left."""

    def __init__(self, base, sweep: Sweep, workdir: str, options: StorageOptions, *, pack: int,
                 poll_interval: float = 2.0, salt: int = 0, vmap_width: int | None = None) -> None:
        self.base, self.sweep, self.workdir, self.options = base, sweep, workdir, options
        self.pack = max(int(pack), 1)
        self.poll_interval = poll_interval
        self.vmap_width = vmap_width
        self.study, self.storage, self.created = open_study(base, sweep, options, salt=salt)
        self.owner = this_owner()
        self.heartbeat = _Heartbeat(self.storage, options.heartbeat_interval)
        self.ran = 0
        self._prepared: set[int] = set()

    # -- claiming ----------------------------------------------------------------------------

    def _duplicate_of(self, trial_number: int, slot: int) -> int | None:
        for u in self.study.get_trials(deepcopy=False):
            if u.number == trial_number or u.user_attrs.get(SLOT) != slot:
                continue
            if _done(u) or (_live(u) and u.number < trial_number):
                return u.number
        return None

    def _fail(self, trial, message: str) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(ERROR, message)
        self.study.tell(trial, state=TrialState.FAIL)
        self.heartbeat.remove(trial._trial_id)

    def claim(self, n: int) -> list[_Claim]:
        from optuna.trial import TrialState

        claims: list[_Claim] = []
        while len(claims) < n:
            trial = _pop_waiting(self.study)
            if trial is None:
                break
            trial.set_user_attr(OWNER, self.owner)
            self.heartbeat.add(trial._trial_id)
            slot = int(trial.user_attrs.get(SLOT, -1))
            dup = self._duplicate_of(trial.number, slot)
            if slot < 0 or dup is not None:
                trial.set_user_attr(DUPLICATE, dup if dup is not None else -1)
                self.study.tell(trial, state=TrialState.FAIL)
                self.heartbeat.remove(trial._trial_id)
                continue
            workdir = os.path.join(self.workdir, "trials", f"{slot:04d}")
            trial.set_user_attr(WORKDIR, os.path.abspath(workdir))
            try:
                values = space_lib.suggest(trial, self.sweep, self.base)
                trial.set_user_attr(VALUES, space_lib._jsonable(values))
                config = apply_point(self.base, values)
                from cnnlab.train import validate_config

                validate_config(config)
            except Exception as e:  # noqa: BLE001 - recorded on the trial
                print(f"[sweep] trial {trial.number} (slot {slot}) rejected: {e}", flush=True)
                self._fail(trial, f"{type(e).__name__}: {e}")
                continue
            claims.append(_Claim(trial, slot, values, config, workdir, time.perf_counter()))
        return claims

    # -- running -----------------------------------------------------------------------------

    def _prepare(self, c: _Claim) -> None:
        if c.trial.number in self._prepared:
            return
        self._prepared.add(c.trial.number)
        os.makedirs(c.workdir, exist_ok=True)
        write_config_file(
            c.config, os.path.join(c.workdir, "config.py"),
            docstring=(f"Trial {c.trial.number} (slot {c.slot}) of the sweep in {self.workdir}: "
                       f"{_format_values(c.values)}.\n\n    cnnlab train --config={c.workdir}/config.py "
                       f"--workdir={c.workdir}"),
        )
        with open(os.path.join(c.workdir, "sweep_attempts.jsonl"), "a") as f:
            f.write(json.dumps({"trial": c.trial.number, "slot": c.slot, "time": time.time(),
                                **{k: self.owner[k] for k in ("host", "pid")}}) + "\n")

    def _report(self, c: _Claim, epoch: int, record: dict[str, Any]) -> None:
        from cnnlab.train import StopTraining

        value = record.get(self.sweep.metric)
        if value is None:
            return
        c.trial.report(float(value), epoch)
        if c.trial.should_prune():
            print(f"[sweep] trial {c.trial.number} pruned at epoch {epoch} "
                  f"({self.sweep.metric}={value:.4f}).", flush=True)
            raise StopTraining()

    def _finish(self, c: _Claim, metrics: dict[str, Any] | None, *, pruned: bool = False,
                error: BaseException | None = None, pack_size: int = 1,
                timings: dict[str, float] | None = None) -> None:
        optuna = _optuna()
        from optuna.trial import TrialState

        trial = c.trial
        duration = time.perf_counter() - c.start
        try:
            trial.set_user_attr(DURATION, round(duration, 3))
            trial.set_user_attr(PACKED, pack_size)
            if timings:
                trial.set_user_attr(TIMINGS, {k: round(v, 3) for k, v in timings.items()})
            if metrics:
                trial.set_user_attr(METRICS, {k: v for k, v in metrics.items()
                                              if isinstance(v, (int, float))})
            value = None if metrics is None else metrics.get(self.sweep.metric)
            if error is not None:
                self._fail(trial, f"{type(error).__name__}: {error}")
                print(f"[sweep] trial {trial.number} (slot {c.slot}) FAILED: {type(error).__name__}: "
                      f"{error}", flush=True)
            elif pruned:
                self.study.tell(trial, state=TrialState.PRUNED)
            elif value is None:
                self._fail(trial, f"KeyError: the final metrics have no {self.sweep.metric!r} "
                                  f"(eval_every_epochs?): {sorted(metrics or {})}")
            else:
                self.study.tell(trial, float(value))
                print(f"[sweep] trial {trial.number} (slot {c.slot}) {_format_values(c.values)}: "
                      f"{self.sweep.metric}={value:.4f} ({duration:.1f} s"
                      f"{f', packed x{pack_size}' if pack_size > 1 else ''}).", flush=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            print(f"[sweep] trial {trial.number} was taken over (its heartbeat went stale); its "
                  "result is not recorded here.", flush=True)
        finally:
            self.heartbeat.remove(trial._trial_id)
            self.ran += 1

    def _fault(self, slot: int) -> None:
        # Test hook: CNNLAB_SWEEP_FAULT_KILL_IN_SLOT="slot:step" kills this worker at that step.
        spec = os.environ.get(_FAULT_KILL_IN_SLOT, "")
        if spec and int(spec.split(":")[0]) == slot:
            os.environ["CNNLAB_FAULT_KILL_AT_STEP"] = spec.split(":")[1]
        else:
            os.environ.pop("CNNLAB_FAULT_KILL_AT_STEP", None)

    def run_alone(self, c: _Claim) -> None:
        from cnnlab.train import train_and_evaluate

        self._prepare(c)
        self._fault(c.slot)
        pruned = []

        def on_epoch_end(epoch, record):
            try:
                self._report(c, epoch, record)
            except Exception:
                pruned.append(True)
                raise

        print(f"[sweep] trial {c.trial.number} (slot {c.slot}) {_format_values(c.values)} -> "
              f"{c.workdir}", flush=True)
        try:
            metrics = train_and_evaluate(c.config, c.workdir, on_epoch_end=on_epoch_end)
        except Exception as e:  # noqa: BLE001 - recorded on the trial, the sweep goes on
            traceback.print_exc()
            self._finish(c, None, error=e)
            return
        self._finish(c, metrics, pruned=bool(pruned))

    def run_packed(self, claims: list[_Claim]) -> None:
        from cnnlab.train.group import NotPackable, train_packed

        for c in claims:
            self._prepare(c)
        self._fault(claims[0].slot)
        print(f"[sweep] packing trials {[c.trial.number for c in claims]} into one program.", flush=True)
        try:
            outcomes, timings = train_packed(
                [c.config for c in claims], [c.workdir for c in claims],
                on_epoch_end=lambda k, epoch, record: self._report(claims[k], epoch, record),
                tag=lambda k: f"[trial {claims[k].trial.number}]", vmap_width=self.vmap_width,
            )
        except NotPackable:
            raise
        except Exception as e:  # noqa: BLE001 - the whole pack failed (e.g. data): each trial records it
            traceback.print_exc()
            for c in claims:
                self._finish(c, None, error=e, pack_size=len(claims))
            return
        print("[sweep] pack timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)
        for c, out in zip(claims, outcomes):
            self._finish(c, out.metrics, pruned=out.pruned, error=out.error, pack_size=len(claims),
                         timings=timings)

    def run_claims(self, claims: list[_Claim]) -> None:
        """Groups the claims into packs of equal pack key and start step; runs each."""
        from cnnlab.train.checkpoint import Checkpoints
        from cnnlab.train.group import NotPackable, pack_key

        groups: dict[Any, list[_Claim]] = {}
        for c in claims:
            key = None
            if self.pack > 1:
                try:
                    key = pack_key(c.config)
                except ValueError:
                    key = None
            if key is not None:
                latest = Checkpoints(c.workdir, keep=1, best_metric=c.config.checkpoint.best_metric,
                                     best_mode=c.config.checkpoint.best_mode)
                key = (key, latest.latest_step() or 0)  # packs resume from one step
                latest.close()
            groups.setdefault(key if key is not None else ("alone", c.trial.number), []).append(c)
        for group in groups.values():
            if len(group) == 1:
                self.run_alone(group[0])
                continue
            try:
                self.run_packed(group)
            except NotPackable as e:
                print(f"[sweep] not packable ({e}); running one at a time.", flush=True)
                for c in group:
                    self.run_alone(c)

    def run(self) -> int:
        """Works until the study has no waiting or running trials; returns trials run here."""
        from optuna.trial import TrialState

        try:
            while True:
                recover_interrupted(self.study, self.storage, max_retry=self.options.max_retry,
                                    grace_period=self.options.grace_period)
                claims = self.claim(self.pack)
                if claims:
                    self.run_claims(claims)
                    continue
                states = [t.state for t in self.study.get_trials(deepcopy=False)]
                if TrialState.RUNNING in states or TrialState.WAITING in states:
                    time.sleep(self.poll_interval)  # others are at work: stay to take over theirs
                    continue
                if _ensure_slots(self.study, self.sweep, self.base, max_retry=self.options.max_retry):
                    continue
                return self.ran
        finally:
            self.heartbeat.close()


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _write_sweep_json(workdir: str, base, sweep: Sweep, options: StorageOptions) -> None:
    write_json_atomic(os.path.join(workdir, SWEEP_JSON), {
        "sweep": sweep.to_dict(),
        "fields": sweep.fields(),
        "base_config": base.to_dict(),
        "fingerprint": space_lib.fingerprint(base, sweep),
        "storage": _masked(options.url),
        "study_name": options.study_name,
    })


def _worker_main(base_dict: dict, sweep: Sweep, workdir: str, options: StorageOptions, pack: int,
                 poll_interval: float, index: int, log_path: str, vmap_width: int | None) -> None:
    """A ``--workers`` child: output to its log file, then the worker loop."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    base = ml_collections.ConfigDict(base_dict)
    Worker(base, sweep, workdir, options, pack=pack, poll_interval=poll_interval, salt=index,
           vmap_width=vmap_width).run()


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
    """Runs (or resumes) ``sweep`` over ``base`` in ``workdir``; returns the report's summary.

    Args:
        base: the base training config (a sweep file's ``get_config()``).
        sweep: the search space (its ``get_sweep()``); validated with :func:`validate_sweep`
            before anything runs.
        workdir: holds ``study.db`` (unless ``storage`` is given), ``sweep.json``, ``trials/``
            and the report.
        storage: an SQLAlchemy URL (``postgresql://user@host:5432/db``) to share the study
            with workers on other machines running the same command.
        study_name: the study's name in the storage.
        workers: local worker processes (each claims trials from the same study).
        pack: trials trained together in one program (default ``sweep.pack``).
        heartbeat_interval, grace_period: seconds; a running trial without a heartbeat for
            ``grace_period`` is considered interrupted and retried.
        max_retry: how often an interrupted slot is retried.
        poll_interval: seconds between checks while other workers hold the last trials.
        vmap_width: packed trials computed side by side by ``jax.vmap`` (the others loop in
            the same program); default: all on GPU/TPU, 1 on CPU (see ``cnnlab.train.group.over_trials``).
        report: write the sweep report at the end.
    """
    base = copy_config(base)
    validate_sweep(sweep, base)
    os.makedirs(workdir, exist_ok=True)
    options = StorageOptions(url=storage or default_storage(workdir), study_name=study_name,
                             heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                             max_retry=max_retry)
    pack = sweep.pack if pack is None else int(pack)
    _write_sweep_json(workdir, base, sweep, options)
    print(f"[sweep] {sweep.kind} sweep of {sweep.num_slots} trials over {sweep.fields()} -> "
          f"{workdir} (study {study_name!r} in {_masked(options.url)}; {workers} worker(s), "
          f"pack {pack}).", flush=True)
    t0 = time.perf_counter()
    if workers <= 1:
        Worker(base, sweep, workdir, options, pack=pack, poll_interval=poll_interval,
               vmap_width=vmap_width).run()
    else:
        _run_workers(base, sweep, workdir, options, pack, poll_interval, workers, vmap_width)
    print(f"[sweep] done in {time.perf_counter() - t0:.1f} s.", flush=True)
    if not report:
        return {}
    from cnnlab.sweep.report import write_report

    return write_report(workdir, storage=storage, study_name=study_name)


def _run_workers(base, sweep, workdir, options, pack, poll_interval, workers: int, vmap_width) -> None:
    import multiprocessing

    from optuna.trial import TrialState

    study, _, _ = open_study(base, sweep, options)  # create and enqueue once, before the workers
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(workers):
        log = os.path.join(logs, f"worker-{i}.log")
        p = ctx.Process(target=_worker_main, name=f"cnnlab-sweep-worker-{i}",
                        args=(base.to_dict(), sweep, workdir, options, pack, poll_interval, i, log,
                              vmap_width))
        p.start()
        procs.append(p)
    print(f"[sweep] started {workers} workers (logs in {logs}).", flush=True)
    last = None
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(min(poll_interval, 2.0))
            counts: dict[str, int] = {}
            for t in study.get_trials(deepcopy=False):
                if DUPLICATE not in t.user_attrs:
                    counts[t.state.name] = counts.get(t.state.name, 0) + 1
            if counts != last:
                print("[sweep] " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())),
                      flush=True)
                last = counts
    finally:
        for p in procs:
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        print(f"[sweep] {len(bad)} worker(s) exited with codes {bad}; see {logs}.", flush=True)
    left = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    if left:
        raise RuntimeError(f"Trials {left} are still waiting; run the command again to finish them.")


def trial_workdirs(workdir: str) -> Sequence[str]:
    """The trial directories under ``workdir/trials``."""
    root = os.path.join(workdir, "trials")
    return sorted(os.path.join(root, d) for d in os.listdir(root)) if os.path.isdir(root) else []
