"""``cnnlab sweep`` and ``cnnlab sweep report``: their flags and bodies (:mod:`cnnlab.cli`
parses, prints ``--help`` and reports errors).

    cnnlab sweep --config=configs/sweeps/smoke_grid.py --workdir=runs/smoke_grid \\
        [--workers=2] [--pack=8] [--storage=postgresql://user@host:5432/db] [--config.num_epochs=3]
    cnnlab sweep report --workdir=runs/smoke_grid
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_sweep_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Sweep file: get_config() (the base, overridable with --config.<key>) and "
        "get_sweep().", lock_config=True)
    flags.DEFINE_string("workdir", None, "Sweep directory: study.db, trials/<slot>/, the report.")
    flags.DEFINE_string("storage", None, "Study storage URL (default: sqlite in --workdir); a "
                        "PostgreSQL URL lets workers on many machines share the study.")
    flags.DEFINE_string("study_name", "sweep", "Name of the study in the storage.")
    flags.DEFINE_integer("workers", 1, "Local worker processes.", lower_bound=1)
    flags.DEFINE_integer("pack", None, "Trials trained together in one compiled program "
                         "(default: the sweep's pack); 1 trains each alone.", lower_bound=1)
    flags.DEFINE_integer("vmap_width", 0, "Packed trials computed side by side with jax.vmap (the "
                         "rest loop inside the same program); 0 = all on GPU/TPU, 1 on CPU.", lower_bound=0)
    flags.DEFINE_integer("heartbeat", 10, "Seconds between a running trial's heartbeats.", lower_bound=1)
    flags.DEFINE_integer("grace", 60, "Seconds without heartbeat after which a trial counts as "
                         "interrupted and is retried.", lower_bound=1)
    flags.DEFINE_integer("max_retry", 3, "Retries of an interrupted trial.", lower_bound=0)


def define_report_flags() -> None:
    flags.DEFINE_string("workdir", None, "Sweep directory written by `cnnlab sweep`.")
    flags.DEFINE_string("storage", None, "Study storage URL (default: the one in sweep.json).")
    flags.DEFINE_string("study_name", None, "Study name (default: the one in sweep.json).")


def sweep(argv: list[str]) -> None:
    """``cnnlab sweep``: runs the sweep file's study in ``--workdir``."""
    del argv
    from cnnlab.sweep.files import load_sweep_file
    from cnnlab.sweep.launch import run_sweep

    spec = load_sweep_file(config_flags.get_config_filename(FLAGS["config"]))
    run_sweep(FLAGS.config, spec, FLAGS.workdir, storage=FLAGS.storage, study_name=FLAGS.study_name,
              workers=FLAGS.workers, pack=FLAGS.pack, heartbeat_interval=FLAGS.heartbeat,
              grace_period=FLAGS.grace, max_retry=FLAGS.max_retry, vmap_width=FLAGS.vmap_width or None)


def report(argv: list[str]) -> None:
    """``cnnlab sweep report``: (re)writes the sweep's tables and plots."""
    del argv
    from cnnlab.sweep.report import write_report

    write_report(FLAGS.workdir, storage=FLAGS.storage, study_name=FLAGS.study_name)
