"""A sweep worker: claims trials of the study, trains each group of them through the one
training entry point :func:`cnnlab.train.train_trials`, and records the results.

Slot ``i`` trains in ``<workdir>/trials/<i:04d>``, an ordinary run directory (``config.json``,
``config.py``, metrics, checkpoints, reports), so a retried slot resumes from its own checkpoint
and any trial can be resumed with ``cnnlab train --config=<trial>/config.py --workdir=<trial>``.
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
                values = space_lib.suggest(trial, self.sweep, self.base)
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

    def _prepare(self, c: _Claim) -> None:
        """Writes the trial's ``config.py`` and records this attempt, once per claim."""
        os.makedirs(c.workdir, exist_ok=True)
        write_config_file(
            c.config, os.path.join(c.workdir, "config.py"),
            docstring=(f"Trial {c.trial.number} (slot {c.slot}) of the sweep in {self.workdir}: "
                       f"{format_values(c.values)}.\n\n    cnnlab train --config={c.workdir}/config.py "
                       f"--workdir={c.workdir}"),
        )
        with open(os.path.join(c.workdir, "sweep_attempts.jsonl"), "a") as f:
            f.write(json.dumps({"trial": c.trial.number, "slot": c.slot, "time": time.time(),
                                **{k: self.owner[k] for k in ("host", "pid")}}) + "\n")

    def _report(self, c: _Claim, epoch: int, record: dict[str, Any]) -> None:
        value = record.get(self.sweep.metric)
        if value is None:
            return
        c.trial.report(float(value), epoch)
        if c.trial.should_prune():
            log(f"trial {c.trial.number} pruned at epoch {epoch} ({self.sweep.metric}={value:.4f}).")
            raise train_lib.StopTraining()

    def _finish(self, c: _Claim, outcome, *, pack_size: int, timings: dict[str, float]) -> None:
        """Records ``outcome`` (a :class:`~cnnlab.train.TrialOutcome`) on the trial."""
        trial, metrics, error = c.trial, outcome.metrics, outcome.error
        duration = time.perf_counter() - c.start
        try:
            trial.set_user_attr(study_lib.DURATION, round(duration, 3))
            trial.set_user_attr(study_lib.PACKED, pack_size)
            trial.set_user_attr(study_lib.TIMINGS, {k: round(v, 3) for k, v in timings.items()})
            if metrics:
                trial.set_user_attr(study_lib.METRICS, {k: v for k, v in metrics.items()
                                                        if isinstance(v, (int, float))})
            value = metrics.get(self.sweep.metric)
            if error is not None:
                self._fail(trial, f"{type(error).__name__}: {error}")
                log(f"trial {trial.number} (slot {c.slot}) FAILED: {type(error).__name__}: {error}")
            elif outcome.pruned:
                self.study.tell(trial, state=TrialState.PRUNED)
            elif value is None:
                self._fail(trial, f"KeyError: the final metrics have no {self.sweep.metric!r} "
                                  f"(eval_every_epochs?): {sorted(metrics)}")
            else:
                self.study.tell(trial, float(value))
                log(f"trial {trial.number} (slot {c.slot}) {format_values(c.values)}: "
                    f"{self.sweep.metric}={value:.4f} ({duration:.1f} s"
                    f"{f', packed x{pack_size}' if pack_size > 1 else ''}).")
        except load_optuna().exceptions.UpdateFinishedTrialError:
            log(f"trial {trial.number} was taken over (its heartbeat went stale); its result is "
                "not recorded here.")
        finally:
            self.heartbeat.remove(trial)
            self.ran += 1

    def train(self, group: list[_Claim]) -> None:
        """Trains ``group`` (claims of equal pack key) through the one training entry point; a
        group that turns out not to be packable runs one trial at a time."""
        # Test hook: CNNLAB_SWEEP_FAULT_KILL_IN_SLOT="slot:step" kills this worker at that step.
        spec = os.environ.get(_FAULT_KILL_IN_SLOT, "")
        if spec and int(spec.split(":")[0]) == group[0].slot:
            os.environ["CNNLAB_FAULT_KILL_AT_STEP"] = spec.split(":")[1]
        else:
            os.environ.pop("CNNLAB_FAULT_KILL_AT_STEP", None)
        if len(group) > 1:
            log(f"packing trials {[c.trial.number for c in group]} into one program.")
        else:
            log(f"trial {group[0].trial.number} (slot {group[0].slot}) "
                f"{format_values(group[0].values)} -> {group[0].workdir}")
        try:
            outcomes, timings = train_lib.train_trials(
                [c.config for c in group], [c.workdir for c in group],
                on_epoch_end=lambda k, epoch, record: self._report(group[k], epoch, record),
                tag=lambda k: f"[trial {group[k].trial.number}]", vmap_width=self.vmap_width,
            )
        except Exception as e:  # noqa: BLE001 - the whole group failed: each trial records it
            if isinstance(e, train_lib.NotPackable) and len(group) > 1:
                log(f"not packable ({e}); running one at a time.")
                for c in group:
                    self.train([c])
                return
            traceback.print_exc()
            outcomes, timings = [train_lib.TrialOutcome(metrics={}, error=e) for _ in group], {}
        if len(group) > 1 and timings:
            log("pack timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        for c, out in zip(group, outcomes):
            self._finish(c, out, pack_size=len(group), timings=timings)

    def groups(self, claims: list[_Claim]) -> list[list[_Claim]]:
        """The claims grouped by :func:`~cnnlab.train.pack_key`; a claim that cannot pack (pack
        1, key ``None``, or a config ``pack_key`` rejects) is alone."""
        groups: dict[Any, list[_Claim]] = {}
        for c in claims:
            try:
                key = train_lib.pack_key(c.config) if self.pack > 1 else None
            except ValueError:
                key = None
            groups.setdefault(("alone", c.trial.number) if key is None else key, []).append(c)
        return list(groups.values())

    def run(self) -> int:
        """Works until the study has no waiting or running trials; returns trials run here."""
        try:
            while True:
                study_lib.recover_interrupted(self.study, self.storage, max_retry=self.options.max_retry,
                                              grace_period=self.options.grace_period)
                claims = self.claim(self.pack)
                if claims:
                    for group in self.groups(claims):
                        for c in group:
                            self._prepare(c)
                        self.train(group)
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
