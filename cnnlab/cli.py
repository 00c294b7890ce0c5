"""The ``cnnlab`` command: ``train``, ``eval``, ``report`` and ``sweep`` (absl flags,
ml_collections configs).

    cnnlab train --config=configs/stridednet.py --workdir=runs/stridednet \\
        --config.optimizer.learning_rate=3e-4
    cnnlab eval --workdir=runs/stridednet [--which=best|latest]
    cnnlab report --workdir=runs/stridednet
    cnnlab sweep --config=configs/sweeps/smoke_grid.py --workdir=runs/smoke_grid [--workers=2]
    cnnlab sweep report --workdir=runs/smoke_grid
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
COMMANDS = ("train", "eval", "report", "sweep")

_USAGE = f"usage: cnnlab {{{','.join(COMMANDS)}}} [flags]   (cnnlab <command> --help for flags)"


def _define_distributed_flags() -> None:
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0 for a multi-process run (else $CNNLAB_COORDINATOR_ADDRESS).",
    )
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _define_train_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, reports).")
    flags.DEFINE_bool(
        "allow_config_change", False,
        "Resume a run whose recorded config differs from --config (the change is recorded).",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    _define_distributed_flags()


_TRAIN_FLAGS = ("config", "workdir", "allow_config_change", "coordinator_address", "num_processes",
                "process_id")


def _train_help(argv: list[str]) -> str:
    """``cnnlab train``'s flags and every config field (type, default, doc) from the schema,
    including what the ``--config`` file registers (its module is run first)."""
    import importlib.util

    from cnnlab.train.config import config_help

    for path in [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
        spec = importlib.util.spec_from_file_location("cnnlab_help_config", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))

    lines = ["usage: cnnlab train --config=<file.py> --workdir=<dir> [--config.<key>=<value> ...]", ""]
    lines += [f"  --{n}: {FLAGS[n].help} (default: {FLAGS[n].default!r})" for n in _TRAIN_FLAGS]
    lines += ["", "Config fields (--config.<key>=<value>), as key (type, default): doc:", ""]
    return "\n".join(lines + ["  " + line for line in config_help().splitlines()])


def _define_eval_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory written by `cnnlab train`.")
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
    flags.mark_flags_as_required(["workdir"])


def _initialize_distributed() -> None:
    from cnnlab.train.distributed import initialize

    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def _quiet_libraries() -> None:
    """Orbax logs every checkpoint step at INFO; keep the console for our own output unless
    the user asked for a verbosity (``-v``/``--verbosity``)."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _train(argv) -> None:
    del argv
    _quiet_libraries()
    _initialize_distributed()
    from cnnlab.train import train_and_evaluate

    final = train_and_evaluate(
        FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
    )
    print("final:", "  ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float)))


def _eval(argv) -> None:
    del argv
    _quiet_libraries()
    from cnnlab.train import evaluate

    out = evaluate(None, FLAGS.workdir, which=FLAGS.which)
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))


def _report(argv) -> None:
    del argv
    from cnnlab.train.report import format_report, write_reports
    from cnnlab.train.trainer import load_run_config  # noqa: F401  (validates the workdir)

    load_run_config(FLAGS.workdir)
    report = write_reports(FLAGS.workdir)
    if report:
        import json
        import os

        with open(os.path.join(FLAGS.workdir, "classes.json")) as f:
            print(format_report(report, json.load(f)))
    print(f"Reports written to {FLAGS.workdir}.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        given = argv[1] if len(argv) > 1 else None
        if given in ("-h", "--help", "help", None):
            print(_USAGE)
            sys.exit(0 if given else 2)
        print(f"cnnlab: unknown command {given!r}.\n{_USAGE}", file=sys.stderr)
        sys.exit(2)
    command = argv.pop(1)
    # A user's config file imports their own modules (models, ops, metrics) from beside it.
    for path in [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    if command == "train":
        _define_train_flags()
        if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
            print(_train_help(argv))
            sys.exit(0)
        app.run(_train, argv=argv)
    elif command == "eval":
        _define_eval_flags()
        app.run(_eval, argv=argv)
    elif command == "sweep":
        from cnnlab.sweep.cli import main as sweep_main

        sweep_main(argv)
    else:
        _define_eval_flags()
        app.run(_report, argv=argv)


if __name__ == "__main__":
    main()
