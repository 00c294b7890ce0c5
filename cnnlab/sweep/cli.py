"""``cnnlab sweep`` and ``cnnlab sweep report`` (dispatched from :mod:`cnnlab.cli`).

    cnnlab sweep --config=configs/sweeps/smoke_grid.py --workdir=runs/smoke_grid \\
        [--workers=2] [--pack=8] [--storage=postgresql://user@host:5432/db] [--config.num_epochs=3]
    cnnlab sweep report --workdir=runs/smoke_grid
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_sweep_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Sweep file: get_config() (the base, overridable with --config.<field>) and "
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
    flags.mark_flags_as_required(["config", "workdir"])


def _define_report_flags() -> None:
    flags.DEFINE_string("workdir", None, "Sweep directory written by `cnnlab sweep`.")
    flags.DEFINE_string("storage", None, "Study storage URL (default: the one in sweep.json).")
    flags.DEFINE_string("study_name", None, "Study name (default: the one in sweep.json).")
    flags.mark_flags_as_required(["workdir"])


def _quiet() -> None:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _sweep(argv) -> None:
    del argv
    _quiet()
    from cnnlab.sweep.files import load_sweep_file
    from cnnlab.sweep.launch import run_sweep

    sweep = load_sweep_file(config_flags.get_config_filename(FLAGS["config"]))
    run_sweep(FLAGS.config, sweep, FLAGS.workdir, storage=FLAGS.storage, study_name=FLAGS.study_name,
              workers=FLAGS.workers, pack=FLAGS.pack, heartbeat_interval=FLAGS.heartbeat,
              grace_period=FLAGS.grace, max_retry=FLAGS.max_retry, vmap_width=FLAGS.vmap_width or None)


def _report(argv) -> None:
    del argv
    _quiet()
    from cnnlab.sweep.report import write_report

    write_report(FLAGS.workdir, storage=FLAGS.storage, study_name=FLAGS.study_name)


def main(argv: list[str]) -> None:
    """``argv`` without the ``sweep`` command word (``argv[0]`` is the program)."""
    if len(argv) > 1 and argv[1] == "report":
        argv.pop(1)
        _define_report_flags()
        app.run(_report, argv=argv)
    else:
        _define_sweep_flags()
        app.run(_sweep, argv=argv)
