"""A sweep worker: claims trials of the study, trains each group of them through the one
training entry point :func:`cnnlab.train.train_trials`, and records the results.

Slot ``i`` trains in ``<workdir>/trials/<i:04d>``, an ordinary run directory (``config.json``,
``config.py``, metrics, checkpoints, reports), so a retried slot resumes from its own checkpoint
and any trial can be resumed with ``cnnlab train --config=<trial>/config.py --workdir=<trial>``.
With ``Sweep(folds=k)`` a slot's k runs are ``<workdir>/trials/<i:04d>/fold_<j>``, each
validating on its fold; their mean is the trial's value.
A trial that raises (NaN loss, a value the data or model rejects) is ``FAIL`` with
``cnnlab.error`` set, and the sweep goes on. The objective is the sweep's ``metric`` at a
trial's last evaluation; it is reported after every evaluation, so pruners can stop trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from typing import Any

import ml_collections
from optuna.trial import TrialState

from cnnlab import train as train_lib  # train_lib.train_trials looked up per call (tests patch it)
from cnnlab.sweep import space as space_lib
from cnnlab.sweep import study as study_lib
from cnnlab.sweep._optuna_adapter import load as load_optuna
from cnnlab.sweep._optuna_adapter import pop_waiting
from cnnlab.sweep.files import write_config_file
from cnnlab.sweep.report import format_values
from cnnlab.sweep.space import Sweep, apply_point
from cnnlab.sweep.study import DUPLICATE, ERROR, OWNER, SLOT, VALUES, WORKDIR, StorageOptions, log

_FAULT_KILL_IN_SLOT = "CNNLAB_SWEEP_FAULT_KILL_IN_SLOT"  # "slot:step", for the resume test


@dataclasses.dataclass
class _Claim:
    trial: Any
    slot: int
    values: dict[str, Any]
    config: ml_collections.ConfigDict
    workdir: str
    start: float
    #: with folds: ``{epoch: {fold: metric}}`` until every fold has reached the epoch
    fold_metrics: dict[int, dict[int, float]] = dataclasses.field(default_factory=dict)
    pruned: bool = False
    #: filled by :meth:`Worker.train_claims`: each run's ``(run, outcome)``, the largest pack any
    #: of its runs trained in, and that pack's timings
    results: list[tuple[_Run, Any]] = dataclasses.field(default_factory=list)
    pack_size: int = 1
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Run:
    """One training run of a claimed trial: the trial itself, or one of its folds."""

    claim: _Claim
    fold: int | None
    config: ml_collections.ConfigDict
    workdir: str

    @property
    def label(self) -> str:
        """``"3"`` (trial 3) or ``"3 fold 1"``."""
        return f"{self.claim.trial.number}{'' if self.fold is None else f' fold {self.fold}'}"


class Worker:
    """Claims trials of one study and trains them (packed when possible) until none are left."""

    def __init__(self, base, sweep: Sweep, workdir: str, options: StorageOptions, *, pack: int,
                 poll_interval: float = 2.0, salt: int = 0, vmap_width: int | None = None) -> None:
        self.base, self.sweep, self.workdir, self.options = base, sweep, workdir, options
        self.pack, self.poll_interval, self.vmap_width = max(int(pack), 1), poll_interval, vmap_width
        self.study, self.storage = study_lib.open_study(base, sweep, options, salt=salt)
        self.owner = study_lib.this_owner()
        self.heartbeat = study_lib.Heartbeat(self.storage, options.heartbeat_interval)
        self.ran = 0

    # -- claiming ----------------------------------------------------------------------------

    def _fail(self, trial, message: str | None) -> None:
        """Ends ``trial`` as ``FAIL``: with ``cnnlab.error = message``, or a dropped duplicate."""
        if message is not None:
            trial.set_user_attr(ERROR, message)
        self.study.tell(trial, state=TrialState.FAIL)
        self.heartbeat.remove(trial)

    def claim(self, n: int) -> list[_Claim]:
        """Up to ``n`` waiting trials, now owned by this worker, with their configs."""
        claims: list[_Claim] = []
        while len(claims) < n:
            trial = pop_waiting(self.study)
            if trial is None:
                break
            trial.set_user_attr(OWNER, self.owner)
            self.heartbeat.add(trial)
            slot = int(trial.user_attrs.get(SLOT, -1))
            dup = -1 if slot < 0 else study_lib.duplicate_of(self.study, trial.number, slot)
            if dup is not None:
                trial.set_user_attr(DUPLICATE, dup)
                self._fail(trial, None)
                continue
            workdir = os.path.join(self.workdir, "trials", f"{slot:04d}")
            trial.set_user_attr(WORKDIR, os.path.abspath(workdir))
            try:
                values = space_lib.suggest(trial, self.sweep, self.base, slot)
                trial.set_user_attr(VALUES, space_lib.jsonable(values))
                config = apply_point(self.base, values)
                train_lib.validate_config(config)
            except Exception as e:  # noqa: BLE001 - recorded on the trial
                log(f"trial {trial.number} (slot {slot}) rejected: {e}")
                self._fail(trial, f"{type(e).__name__}: {e}")
                continue
            claims.append(_Claim(trial, slot, values, config, workdir, time.perf_counter()))
        return claims

    # -- running -----------------------------------------------------------------------------

    def runs(self, c: _Claim) -> list[_Run]:
        """The claim's training runs: the trial, or with ``Sweep(folds=k)`` its k folds."""
        if not self.sweep.folds:
            return [_Run(c, None, c.config, c.workdir)]
        return [_Run(c, j, apply_point(c.config, {"data.folds": self.sweep.folds, "data.fold": j}),
                     os.path.join(c.workdir, f"fold_{j}")) for j in range(self.sweep.folds)]

    def _prepare(self, c: _Claim) -> None:
        """Writes the trial's ``config.py`` (and each fold's) and records this attempt, once
        per claim."""
        os.makedirs(c.workdir, exist_ok=True)
        about = f"Trial {c.trial.number} (slot {c.slot}) of the sweep in {self.workdir}: {format_values(c.values)}."
        if self.sweep.folds:
            about += (f" Cross-validated as {self.sweep.folds} folds in fold_*/; this config trains "
                      "it on the whole training split:\n\n    cnnlab train "
                      f"--config={c.workdir}/config.py --workdir=<a new directory>")
        else:
            about += f"\n\n    cnnlab train --config={c.workdir}/config.py --workdir={c.workdir}"
        write_config_file(c.config, os.path.join(c.workdir, "config.py"), docstring=about)
        for run in self.runs(c) if self.sweep.folds else ():
            os.makedirs(run.workdir, exist_ok=True)
            write_config_file(run.config, os.path.join(run.workdir, "config.py"), docstring=(
                f"Fold {run.fold} of {self.sweep.folds} of trial {c.trial.number} (slot {c.slot}) of "
                f"the sweep in {self.workdir}: {format_values(c.values)}.\n\n    cnnlab train "
                f"--config={run.workdir}/config.py --workdir={run.workdir}"))
        with open(os.path.join(c.workdir, "sweep_attempts.jsonl"), "a") as f:
            f.write(json.dumps({"trial": c.trial.number, "slot": c.slot, "time": time.time(),
                                **{k: self.owner[k] for k in ("host", "pid")}}) + "\n")

    def _report(self, run: _Run, epoch: int, record: dict[str, Any]) -> None:
        """Reports a run's epoch to its trial (with folds, their mean once every fold has
        reached the epoch); stops the run when the trial is pruned."""
        c = run.claim
        if c.pruned:
            raise train_lib.StopTraining()
        value = record.get(self.sweep.metric)
        if value is None:
            return
        if run.fold is not None:
            reached = c.fold_metrics.setdefault(epoch, {})
            reached[run.fold] = float(value)
            if len(reached) < self.sweep.folds:
                return
            value = sum(reached.values()) / len(reached)
        c.trial.report(float(value), epoch)
        if c.trial.should_prune():
            log(f"trial {c.trial.number} pruned at epoch {epoch} ({self.sweep.metric}={value:.4f}).")
            c.pruned = True
            raise train_lib.StopTraining()

    def _combine(self, c: _Claim, results: list[tuple[_Run, Any]]) -> tuple[Any, str | None]:
        """A claim's outcome from its runs': the run's own, or over folds the mean of each
        metric every fold recorded (a fold's error fails the trial, named by the second value)."""
        if len(results) == 1 and results[0][0].fold is None:
            return results[0][1], None
        for run, out in results:
            if out.error is not None:
                return train_lib.TrialOutcome(metrics={}, error=out.error), f"fold {run.fold}"
        rows = [out.metrics for _, out in results]
        common = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and all(k in r for r in rows)]
        metrics = {k: sum(float(r[k]) for r in rows) / len(rows) for k in common}
        per_fold = [r.get(self.sweep.metric) for r in rows]
        if all(v is not None for v in per_fold):
            c.trial.set_user_attr(study_lib.FOLD_VALUES, [float(v) for v in per_fold])
        pruned = c.pruned or any(out.pruned for _, out in results)
        return train_lib.TrialOutcome(metrics=metrics, pruned=pruned), None

    def _finish(self, c: _Claim) -> None:
        """Records the outcome of the claim's runs (:class:`~cnnlab.train.TrialOutcome`) on
        the trial."""
        trial = c.trial
        pack_size, timings = c.pack_size, c.timings
        results = sorted(c.results, key=lambda ro: ro[0].fold or 0)
        duration = time.perf_counter() - c.start
        try:
            outcome, where = self._combine(c, results)
            metrics, error = outcome.metrics, outcome.error
            trial.set_user_attr(study_lib.DURATION, round(duration, 3))
            trial.set_user_attr(study_lib.PACKED, pack_size)
            trial.set_user_attr(study_lib.TIMINGS, {k: round(v, 3) for k, v in timings.items()})
            if metrics:
                trial.set_user_attr(study_lib.METRICS, {k: v for k, v in metrics.items()
                                                        if isinstance(v, (int, float))})
            value = metrics.get(self.sweep.metric)
            if error is not None and where:
                self._fail(trial, f"{where}: {type(error).__name__}: {error}")
                log(f"trial {trial.number} (slot {c.slot}) FAILED in {where}: {type(error).__name__}: {error}")
            elif error is not None:
                self._fail(trial, f"{type(error).__name__}: {error}")
                log(f"trial {trial.number} (slot {c.slot}) FAILED: {type(error).__name__}: {error}")
            elif outcome.pruned:
                self.study.tell(trial, state=TrialState.PRUNED)
            elif value is None:
                self._fail(trial, f"KeyError: the final metrics have no {self.sweep.metric!r} "
                                  f"(eval_every_epochs?): {sorted(metrics)}")
            else:
                self.study.tell(trial, float(value))
                folds = f" (mean of {self.sweep.folds} folds)" if self.sweep.folds else ""
                log(f"trial {trial.number} (slot {c.slot}) {format_values(c.values)}: "
                    f"{self.sweep.metric}={value:.4f}{folds} ({duration:.1f} s"
                    f"{f', packed x{pack_size}' if pack_size > 1 else ''}).")
        except load_optuna().exceptions.UpdateFinishedTrialError:
            log(f"trial {trial.number} was taken over (its heartbeat went stale); its result is "
                "not recorded here.")
        finally:
            self.heartbeat.remove(trial)
            self.ran += 1

    def train(self, group: list[_Run]) -> list[tuple[_Run, Any, int, dict[str, float]]]:
        """Trains ``group`` (runs of equal pack key) through the one training entry point; a
        group that turns out not to be packable runs one at a time. Returns each run's
        ``(run, outcome, pack size, timings)``."""
        # Test hook: CNNLAB_SWEEP_FAULT_KILL_IN_SLOT="slot:step" kills this worker at that step.
        spec = os.environ.get(_FAULT_KILL_IN_SLOT, "")
        if spec and int(spec.split(":")[0]) == group[0].claim.slot:
            os.environ["CNNLAB_FAULT_KILL_AT_STEP"] = spec.split(":")[1]
        else:
            os.environ.pop("CNNLAB_FAULT_KILL_AT_STEP", None)
        if len(group) > 1:
            log(f"packing trials [{', '.join(r.label for r in group)}] into one program.")
        else:
            c = group[0].claim
            log(f"trial {group[0].label} (slot {c.slot}) {format_values(c.values)} -> {group[0].workdir}")
        try:
            outcomes, timings = train_lib.train_trials(
                [r.config for r in group], [r.workdir for r in group],
                on_epoch_end=lambda k, epoch, record: self._report(group[k], epoch, record),
                tag=lambda k: f"[trial {group[k].label}] ", vmap_width=self.vmap_width,
            )
        except Exception as e:  # noqa: BLE001 - the whole group failed: each trial records it
            if isinstance(e, train_lib.NotPackable) and len(group) > 1:
                log(f"not packable ({e}); running one at a time.")
                return [result for r in group for result in self.train([r])]
            traceback.print_exc()
            outcomes, timings = [train_lib.TrialOutcome(metrics={}, error=e) for _ in group], {}
        if len(group) > 1 and timings:
            log("pack timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        return [(r, out, len(group), timings) for r, out in zip(group, outcomes)]

    def groups(self, runs: list[_Run]) -> list[list[_Run]]:
        """The runs grouped by :func:`~cnnlab.train.pack_key`, at most ``pack`` per group; a
        run that cannot pack (pack 1, or a config ``pack_key`` rejects) is alone."""
        groups: dict[Any, list[_Run]] = {}
        for i, r in enumerate(runs):
            try:
                key = train_lib.pack_key(r.config) if self.pack > 1 else None
            except ValueError:
                key = None
            groups.setdefault(("alone", i) if key is None else key, []).append(r)
        return [g[i:i + self.pack] for g in groups.values() for i in range(0, len(g), self.pack)]

    def train_claims(self, claims: list[_Claim]) -> None:
        """Trains the claims' runs, packed where they can be, and records each trial."""
        for c in claims:
            self._prepare(c)
        for group in self.groups([r for c in claims for r in self.runs(c)]):
            for run, out, size, times in self.train(group):
                c = run.claim
                c.results.append((run, out))
                c.pack_size, c.timings = max(c.pack_size, size), times
        for c in claims:
            self._finish(c)

    def run(self) -> int:
        """Works until the study has no waiting or running trials; returns trials run here."""
        try:
            while True:
                study_lib.recover_interrupted(self.study, self.storage, max_retry=self.options.max_retry,
                                              grace_period=self.options.grace_period)
                claims = self.claim(max(1, self.pack // max(self.sweep.folds, 1)))
                if claims:
                    self.train_claims(claims)
                    continue
                if any(study_lib.is_live(t) for t in self.study.get_trials(deepcopy=False)):
                    time.sleep(self.poll_interval)  # others are at work: stay to take over theirs
                    continue
                if study_lib.ensure_slots(self.study, self.sweep, self.base,
                                          max_retry=self.options.max_retry):
                    continue
                return self.ran
        finally:
            self.heartbeat.close()
