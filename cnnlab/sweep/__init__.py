"""Hyperparameter sweeps: config-declared search spaces, packed (vmapped) trials, Optuna studies
that resume and scale to many workers.

A sweep file is a config file with a ``get_sweep()`` beside ``get_config()``::

    from cnnlab import sweep

    def get_config():
        return sweep.config_from_file("../smoke.py", relative_to=__file__)

    def get_sweep():
        return sweep.Sweep(
            grid=sweep.product({"optimizer.learning_rate": [1e-3, 3e-3]}, {"seed": [0, 1]}),
            metric="val/accuracy", mode="max", pack=4,
        )

and runs with ``cnnlab sweep --config=<file> --workdir=<dir>`` (``--workers N`` local worker
processes, ``--storage=postgresql://...`` to share the study between machines, ``--pack K``
trials per compiled program); ``cnnlab sweep report --workdir=<dir>`` rewrites the report.

Modules: :mod:`~cnnlab.sweep.space` (declaring and validating sweeps), :mod:`~cnnlab.sweep.study`
(the Optuna study: storage, slots, recovery), :mod:`~cnnlab.sweep.worker` (claiming and training
trials), :mod:`~cnnlab.sweep.launch` (``run_sweep``, worker processes), :mod:`~cnnlab.sweep.report`
(tables, plots, best config); :mod:`~cnnlab.train.packing` trains K trials in one program.
"""

from __future__ import annotations

from cnnlab._lazy import lazy_attributes
from cnnlab.sweep.files import config_from_file, load_sweep_file, write_config_file
from cnnlab.sweep.space import (
    Grid,
    Sweep,
    apply_point,
    chain,
    choice,
    integer,
    loguniform,
    point,
    product,
    uniform,
    validate_sweep,
    zip,
)

# Modules that import Optuna or the trainer, loaded on first use (sweep files stay light).
_LAZY = {
    "run_sweep": "cnnlab.sweep.launch",
    "Worker": "cnnlab.sweep.worker",
    "default_storage": "cnnlab.sweep.study",
    "NotPackable": "cnnlab.train",
    "pack_key": "cnnlab.train",
    "train_trials": "cnnlab.train",
    "write_report": "cnnlab.sweep.report",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "Grid", "Sweep", "apply_point", "chain", "choice", "config_from_file", "integer",
    "load_sweep_file", "loguniform", "point", "product", "uniform", "validate_sweep",
    "write_config_file", "zip", *_LAZY,
]
