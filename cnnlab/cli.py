"""The ``cnnlab`` command (absl flags, ml_collections configs). ``cnnlab --help`` lists the
commands, ``cnnlab <command> --help`` that command's flags (and, for train/sweep, every config
field from the schema).

    cnnlab train --config=configs/stridednet.py --workdir=runs/stridednet \\
        --config.optimizer.learning_rate=3e-4
    cnnlab eval --workdir=runs/stridednet [--which=best|latest] [--data_dir=DIR] [--output_dir=DIR]
    cnnlab report --workdir=runs/stridednet [--output_dir=DIR] [--overwrite]
    cnnlab sweep --config=configs/sweeps/smoke_grid.py --workdir=runs/smoke_grid [--workers=2]
    cnnlab sweep report --workdir=runs/smoke_grid
    cnnlab summary --config=configs/stridednet.py [--num_classes=N]   (or --workdir=runs/stridednet)

Every command goes through :func:`_run_command`: a user error (bad config, missing data, a
read-only or full disk, a changed run record, an output file that exists without
``--overwrite``, ...) ends as a short message on stderr and a non-zero exit; ``--verbose`` or
``CNNLAB_VERBOSE=1`` adds the traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import errno
import functools
import os
import re
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

#: Each command and its one-line summary (``cnnlab --help``).
COMMANDS = {
    "train": "train a config in a run directory; running it again resumes",
    "eval": "evaluate a run's best or latest checkpoint on its val/test splits",
    "report": "print a run's classification report and redraw its plots",
    "sweep": "run a hyperparameter sweep (`cnnlab sweep report` summarizes one)",
    "predict": "classify image files and folders with a trained run",
    "export": "write a trained run in another format (a Keras or ONNX model)",
    "summary": "print a config's or a run's model: layers, output shapes, parameters, FLOPs",
}
_USAGE = "usage: cnnlab <command> [flags]   (cnnlab <command> --help lists its flags)"
_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")
_VERBOSE_ENV = "CNNLAB_VERBOSE"
_USAGE_EXIT, _ERROR_EXIT, _INTERRUPT_EXIT = 2, 1, 130


class _UsageError(Exception):
    """A bad command line (flag or config override): exit code 2."""




def _define_train_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file with get_config(); override fields "
                                    "as --config.<key>=<value>.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, reports).")
    flags.DEFINE_bool(
        "allow_config_change", False,
        "Resume a run whose recorded config differs from --config (the change is recorded).",
    )
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0 for a multi-process run (else $CNNLAB_COORDINATOR_ADDRESS).",
    )
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _define_report_flags(*, evaluates: bool = False) -> None:
    flags.DEFINE_string("workdir", None, "Run directory written by `cnnlab train` (may be read-only).")
    flags.DEFINE_string("output_dir", None, "Where to write the outputs (default: --workdir; "
                        "skipped with a note when it is not writable).")
    flags.DEFINE_bool("overwrite", False, "Replace output files that exist already (without it, "
                      "an existing one is an error and nothing is written).")
    if evaluates:
        flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
        flags.DEFINE_string("data_dir", None, "Where the run's images are now, if they moved "
                            "(default: its recorded data.data_dir, else $CALTECH101_DIR).")


def _define_summary_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file with get_config() whose model to "
                                    "summarize; override fields as --config.<key>=<value>.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Or a run directory written by `cnnlab train` (its config.json "
                        "and classes.json).")
    flags.DEFINE_integer("num_classes", None, "Classes of the model's output with --config; unset: as many "
                         "as data.classes selects (needed for data.classes='all' of a folder or tfds source).",
                         lower_bound=1)


def _quiet_libraries(verbose: bool) -> None:
    """Orbax logs every checkpoint step at INFO; keep the console for our own output unless
    the user asked for a verbosity (``-v``/``--verbosity``). Orbax also logs the traceback of a
    failed background write that the main thread then raises again: unless ``verbose``, keep
    only its one-line message."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not verbose:
        logging.get_absl_logger().addFilter(_drop_library_tracebacks)


def _drop_library_tracebacks(record) -> bool:
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


def _parse_flags(argv: list[str], own: list[tuple[str, object]] = ()) -> list[str]:
    """absl's parse, with its errors and ml_collections' override errors as :class:`_UsageError`;
    then the ``own`` overrides (:func:`_own_overrides`) are applied to the loaded config."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise _UsageError(str(e)) from e
    except (KeyError, AttributeError) as e:  # an override naming no field ("Did you mean" added)
        raise _UsageError(_key_error_message(e, argv)) from e
    if "config" in FLAGS and FLAGS["config"].present:
        path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]  # x.py:arg
        if not os.path.isfile(path):
            raise _UsageError(f"config file {path!r} not found (--config=<path to a .py file "
                              "with get_config()>)")
        try:
            FLAGS.config.get  # noqa: B018 - a config that failed to load raises its error here
        except OSError as e:
            raise (e.__cause__ or e) from None
    if own:  # the config file loaded: apply the overrides ml_collections could not
        config = FLAGS.config
        with config.unlocked(), config.ignore_type():
            for key, value in own:
                *groups, leaf = key.split(".")
                node = config
                try:
                    for g in groups:
                        node = node[g]
                except (KeyError, AttributeError):
                    raise _UsageError(f"unknown config key {key!r} (the config has no group "
                                      f"{'.'.join(groups)!r})") from None
                node[leaf] = value
    return rest


def _own_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, object]]]:
    """Splits off the ``--config.<key>=<value>`` overrides that ml_collections, which parses a
    value as the type of the config's current value, cannot handle: fields of several types
    (``data.image_size=(64,48)`` where the default is an int) and the model's constructor
    arguments (``model.kwargs.<name>``, an open group the config file may not have filled).
    Their values are Python literals (``0.2``, ``(16,32)``, ``True``) or else plain strings;
    :func:`cnnlab.train.validate_config` checks them like any other field."""
    from cnnlab.schema import Field, flatten
    from cnnlab.train.config import train_schema

    multi = {k for k, f in flatten(train_schema()).items()
             if isinstance(f, Field) and isinstance(f.type_, tuple) and len(f.type_) > 1}
    keep, own, args = [], [], iter(argv)
    for arg in args:
        key, eq, text = arg[len("--config."):].partition("=") if arg.startswith("--config.") else ("", "", "")
        if not key or not (key in multi or key.startswith("model.kwargs.")):
            keep.append(arg)
            continue
        if not eq:
            text = next(args, "")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        own.append((key, tuple(value) if isinstance(value, list) else value))
    return keep, own


def _key_error_message(error: BaseException, argv: list[str]) -> str:
    """One plain line from ml_collections' error for an override naming no field (a KeyError,
    possibly inside an AttributeError, whose text is ``'key'\\nDid you mean "keys" ...``)."""
    text: object = error
    while isinstance(text, BaseException):
        text = text.args[0] if text.args else ""
    lines = str(text).splitlines()
    key = lines[0].strip().strip("'\"") if lines else ""
    used = [a.split("=", 1)[0] for a in argv
            if a.startswith("--config.") and key in a.split("=", 1)[0][len("--config."):].split(".")]
    where = f" in {used[0]}" if used else ""
    match = re.search(r'Did you mean "([^"]+)"', str(text))
    hint = f" (did you mean {match.group(1)!r}?)" if match else ""
    return f"unknown config key {key!r}{where}{hint}"




def _train(argv: list[str]) -> None:
    del argv
    from cnnlab.train import train_and_evaluate
    from cnnlab.train.distributed import initialize

    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    final = train_and_evaluate(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
    print("final:", "  ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float)))


def _eval(argv: list[str]) -> None:
    del argv
    from cnnlab.train import evaluate

    out = evaluate(None, FLAGS.workdir, which=FLAGS.which, output_dir=FLAGS.output_dir,
                   data_dir=FLAGS.data_dir, overwrite=FLAGS.overwrite)
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))


def _report(argv: list[str]) -> None:
    del argv
    import json

    from cnnlab import runfiles
    from cnnlab.train.report import format_report, write_reports
    from cnnlab.train.trainer import load_run_config

    load_run_config(FLAGS.workdir)  # validates the run directory
    with open(os.path.join(FLAGS.workdir, runfiles.CLASSES)) as f:
        class_names = json.load(f)
    report = write_reports(FLAGS.workdir, class_names, output_dir=FLAGS.output_dir,
                           overwrite=FLAGS.overwrite)
    if report:
        print(format_report(report, class_names))


def _predict(argv: list[str]) -> None:
    from cnnlab.inference import predict_main

    predict_main(argv[1:])


def _export(argv: list[str]) -> None:
    from cnnlab.interop import export_main

    export_main(argv[1:])


def _summary(argv: list[str]) -> None:
    """The model of ``--config`` (for its image size and number of classes, the data never
    read) or of the run in ``--workdir``, as :func:`cnnlab.model_summary.summary` prints it."""
    del argv
    import json

    from cnnlab import runfiles
    from cnnlab.data.config import image_hw, known_num_classes
    from cnnlab.model_summary import summary
    from cnnlab.native import conv_impl
    from cnnlab.train.config import validate_config
    from cnnlab.train.experiment import build_model, load_run_config

    if FLAGS["config"].present == bool(FLAGS.workdir):
        raise _UsageError("give --config=<file.py> (a config's model) or --workdir=<run dir> (a trained "
                          "run's), one of them")
    if FLAGS.workdir:
        if FLAGS.num_classes is not None:
            raise _UsageError("--num_classes is for --config; a run's classes.json gives its classes")
        config = load_run_config(FLAGS.workdir)
        with open(os.path.join(FLAGS.workdir, runfiles.CLASSES)) as f:
            num_classes = len(json.load(f))
    else:
        config = validate_config(FLAGS.config)
        num_classes = FLAGS.num_classes or known_num_classes(config.data)
        if num_classes is None:
            raise _UsageError(f"data.classes={config.data.classes!r} of the {config.data.source!r} source has as "
                              "many classes as the data: give --num_classes=N (CALTECH-101: 102, or 101 "
                              "with data.drop_background)")
    with conv_impl.formulation("xla"):  # mixed_precision="auto" decided without building oneDNN
        model = build_model(config, num_classes)
    source = FLAGS.workdir or config_flags.get_config_filename(FLAGS["config"])
    print(f"{source}: model {config.model.name!r} for {num_classes} classes")
    summary(model, (*image_hw(config.data.image_size), 3))


@dataclasses.dataclass(frozen=True)
class _Command:
    usage: str
    run: Callable[[list[str]], None]
    define: Callable[[], None] | None = None  # None: ``run`` parses its own argv and --help
    required: tuple[str, ...] = ()
    config_fields: bool = False  # --help lists the config schema


def _commands() -> dict[str, _Command]:
    from cnnlab.sweep import cli as sweep_cli

    return {
        "train": _Command("cnnlab train --config=<file.py> --workdir=<dir> [--config.<key>=<value> ...]",
                          _train, _define_train_flags, ("config", "workdir"), config_fields=True),
        "eval": _Command("cnnlab eval --workdir=<run dir> [--which=best|latest] [--data_dir=<dir>] "
                         "[--output_dir=<dir>] [--overwrite]",
                         _eval, lambda: _define_report_flags(evaluates=True), ("workdir",)),
        "report": _Command("cnnlab report --workdir=<run dir> [--output_dir=<dir>] [--overwrite]",
                           _report, _define_report_flags, ("workdir",)),
        "sweep": _Command("cnnlab sweep --config=<sweep file.py> --workdir=<dir> [--workers=N] "
                          "[--config.<key>=<value> ...]", sweep_cli.sweep, sweep_cli.define_sweep_flags,
                          ("config", "workdir"), config_fields=True),
        "sweep report": _Command("cnnlab sweep report --workdir=<sweep dir>", sweep_cli.report,
                                 sweep_cli.define_report_flags, ("workdir",)),
        "predict": _Command("cnnlab predict --workdir=<run dir> PATH...", _predict),
        "export": _Command("cnnlab export --workdir=<run dir> --format=keras|onnx OUT.keras|OUT.onnx", _export),
        "summary": _Command("cnnlab summary --config=<file.py> [--config.<key>=<value> ...] [--num_classes=N] "
                            "| --workdir=<run dir>", _summary, _define_summary_flags, config_fields=True),
    }


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."  # str.capitalize() would lower "Keras", "FLOPs"


def _command_help(name: str, command: _Command, own: list[str], argv: list[str]) -> str:
    """The command's own flags (never absl's globals) and, for train/sweep, every config field
    with type, default and doc, including what the ``--config`` file registers (it is run first)."""
    lines = [f"usage: {command.usage}", "", _sentence(COMMANDS[name.split()[0]]), "", "flags:"]
    for n in own:
        tail = "required" if n in command.required else f"default: {FLAGS[n].default!r}"
        lines.append(f"  --{n}: {FLAGS[n].help} ({tail})")
    lines.append(f"  --verbose: on an error, also print the traceback (or set {_VERBOSE_ENV}=1)")
    if command.config_fields:
        import importlib.util

        from cnnlab.train.config import config_help

        for path in [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
            spec = importlib.util.spec_from_file_location("cnnlab_help_config", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        lines += ["", "config fields (--config.<key>=<value>), as key (type, default): doc:", ""]
        lines += ["  " + line for line in config_help().splitlines()]
    return "\n".join(lines)


def _run_command(name: str, command: _Command, argv: list[str], *, verbose: bool) -> None:
    if command.define is None:
        command.run(argv)
        return
    before = set(FLAGS)
    command.define()
    own = [n for n in FLAGS if n not in before]
    if any(a in _HELP for a in argv[1:]):
        print(_command_help(name, command, own, argv))
        return
    flags.mark_flags_as_required(list(command.required))
    own: list[tuple[str, object]] = []
    if command.config_fields:
        argv, own = _own_overrides(argv)
        sys.argv = list(argv)  # ml_collections reads the overrides it parses from sys.argv

    def run(rest: list[str]) -> None:
        _quiet_libraries(verbose)
        command.run(rest)

    app.run(run, argv=argv, flags_parser=functools.partial(_parse_flags, own=own))


_DISK_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def _disk_message(e: OSError, command: str) -> str:
    path = e.filename or "a file"
    elsewhere = "--output_dir=<dir>" if command in ("eval", "report") else "another --workdir"
    if e.errno == errno.EROFS:
        return f"cannot write {path}: the file system is read-only. Write elsewhere ({elsewhere})."
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {path}. Free some space (or lower "
                f"checkpoint.keep) or write elsewhere ({elsewhere}); running the same command "
                "again resumes from the last checkpoint.")
    return (f"permission denied: {path}. Make it accessible to this user (chmod/chown) or use "
            f"another location ({elsewhere}).")


def _raised_in_cnnlab(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here + os.sep)


def _user_error(e: BaseException, command: str) -> tuple[str, int] | None:
    """``(message, exit code)`` when ``e`` is the user's to fix, else None (a bug: traceback).

    User errors are bad command lines (an output file that exists without ``--overwrite``
    included), OS errors (missing or unreadable files, read-only or full disks, also when a
    library wrapped them) and the ValueErrors cnnlab raises to name a bad setting (ConfigError,
    ConfigChangedError, SplitChangedError, a bad sweep space, ...).
    """
    if isinstance(e, _UsageError):
        return str(e), _USAGE_EXIT
    if isinstance(e, FileExistsError):
        from cnnlab.train.report import OutputExistsError

        if isinstance(e, OutputExistsError):  # a record exists: --overwrite missing, a usage error
            return str(e), _USAGE_EXIT
    chain, cause = [], e
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for c in chain:
        # tensorstore (under orbax) reports an OS error as text: ... "<path>": ... [os_error_code='28']
        code = re.search(r"\[os_error_code='(\d+)'\]", str(c)) if not isinstance(c, OSError) else None
        if code:
            path = re.findall(r'"(/[^"]+)"', str(c))
            c = OSError(int(code.group(1)), os.strerror(int(code.group(1))), path[-1] if path else None)
        if isinstance(c, OSError) and c.errno in _DISK_ERRNOS:
            return _disk_message(c, command), _ERROR_EXIT
    if isinstance(e, OSError):
        return (str(e) if e.filename is None or e.filename in str(e) else f"{e}: {e.filename}"), _ERROR_EXIT
    if isinstance(e, (ValueError, FloatingPointError, ImportError)) and _raised_in_cnnlab(e):
        from cnnlab.schema import ConfigError
        from cnnlab.train.rundir import ConfigChangedError

        config_error = isinstance(e, (ConfigError, ConfigChangedError))  # a config change too
        return str(e), (_USAGE_EXIT if config_error else _ERROR_EXIT)
    return None


def main(argv: list[str] | None = None) -> None:
    from cnnlab import runtime

    runtime.configure()  # the command's own process: XLA:CPU's flags and malloc, before JAX starts
    argv = list(sys.argv if argv is None else argv)
    verbose = os.environ.get(_VERBOSE_ENV, "") not in ("", "0")
    for flag in [a for a in argv[1:] if a in ("--verbose", "--verbose=true", "--verbose=1")]:
        argv.remove(flag)
        verbose = True
    given = argv[1] if len(argv) > 1 else None
    if given not in COMMANDS:
        if given in (None, "help", *_HELP):
            width = max(map(len, COMMANDS))
            print("\n".join([_USAGE, "", "commands:"]
                            + [f"  {n:<{width}}  {doc}" for n, doc in COMMANDS.items()]))
            sys.exit(0)
        close = difflib.get_close_matches(str(given), list(COMMANDS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"cnnlab: unknown command {given!r}{hint}.\n{_USAGE}", file=sys.stderr)
        sys.exit(_USAGE_EXIT)
    name = argv.pop(1)
    if name == "sweep" and len(argv) > 1 and argv[1] == "report":
        name += " " + argv.pop(1)
    # A user's config file imports their own modules (models, ops, metrics) from beside it.
    for path in [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    argv[0] = f"cnnlab {name}"
    try:
        _run_command(name, _commands()[name], argv, verbose=verbose)
    except KeyboardInterrupt as e:
        if verbose:
            traceback.print_exc()
        before = ("interrupted before training started (no step taken in this start); the same "
                  "command starts it again, or resumes from the run's latest checkpoint"
                  if name in ("train", "sweep") else "interrupted.")
        print(f"cnnlab {name}: {str(e) or before}", file=sys.stderr)
        sys.exit(_INTERRUPT_EXIT)
    except Exception as e:
        found = _user_error(e, name)
        if found is None:
            raise
        if verbose:
            traceback.print_exc()
        message, code = found
        hint = "--help lists the flags and config fields" if code == _USAGE_EXIT else "--verbose shows the traceback"
        print(f"cnnlab {name}: error: {message}" + ("" if verbose else f"\n(cnnlab {name} {hint})"), file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
