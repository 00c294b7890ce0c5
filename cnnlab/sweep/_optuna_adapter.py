"""The one place cnnlab touches what Optuna keeps private (no public API exists for these)."""

from __future__ import annotations

import warnings
from typing import Any


def load() -> Any:
    """The ``optuna`` module, quiet (warnings only, no experimental-feature notices)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*fixed_params.*")
    return optuna


def trial_id(trial: Any) -> int:
    """The storage id of an ``optuna.Trial`` or ``FrozenTrial`` (what storage methods take)."""
    return trial._trial_id


def pop_waiting(study: Any) -> Any:
    """The next ``WAITING`` trial as an ``optuna.Trial``, moved to ``RUNNING`` by this process
    alone (under the storage's row lock); ``None`` if there is none. ``study.ask()`` would
    create a new trial instead."""
    optuna = load()
    cache = getattr(study, "_thread_local", None)
    if cache is not None and hasattr(cache, "cached_all_trials"):
        cache.cached_all_trials = None  # else a trial claimed elsewhere may look waiting
    trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)
