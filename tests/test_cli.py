"""The ``cnnlab`` command end to end: help, clean user errors, Ctrl-C, read-only run directories."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, SMOKE, fast_only

from cnnlab import cli

TINY = ["--config.num_epochs=30", "--config.data.image_size=16", "--config.data.synthetic_per_class=40",
        "--config.model.kwargs.widths=(8,)", "--config.model.kwargs.dense_units=16",
        "--config.progress=False", "--config.checkpoint.every_steps=2"]


def cnnlab(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cnnlab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def train_args(workdir, *extra):
    return ["train", f"--config={SMOKE}", f"--workdir={workdir}", *TINY, *extra]


def assert_clean_error(proc, *needles, code):
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 4, proc.stderr  # a few lines after any data table
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("args", [["--help"], [], ["help"]])
def test_top_level_help_lists_every_command(args):
    proc = cnnlab(*args)
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "eval", "report", "sweep", "predict", "export", "summary"):
        assert re.search(rf"^  {name} +\S", proc.stdout, re.M), proc.stdout


HELP_CASES = {
    "train": (["train", "--help"], ["--workdir", "--allow_config_change", "--verbose",
                                    "optimizer.learning_rate (float, 0.001): peak learning rate"]),
    "sweep": (["sweep", f"--config={ROOT / 'configs' / 'sweeps' / 'smoke_grid.py'}", "--help"],
              ["--workers: Local worker processes. (default: 1)", "--pack", "schedule.name (str, 'constant')"]),
    "sweep report": (["sweep", "report", "--help"], ["--study_name", "--storage"]),
    "eval": (["eval", "--help"], ["--which: <best|latest>: Checkpoint to evaluate. (default: 'best')",
                                  "--output_dir", "--workdir", "--data_dir", "$CALTECH101_DIR",
                                  "--overwrite: Replace output files that exist already"]),
    "report": (["report", "-h"], ["--output_dir", "--workdir", "--overwrite"]),
    "predict": (["predict", "--help"], ["usage: cnnlab predict", "--workdir", "--top_k"]),
    "export": (["export", "--help"], ["usage: cnnlab export", "--workdir", "--format"]),
    "summary": (["summary", "--help"], ["usage: cnnlab summary", "--config", "--workdir", "--num_classes",
                                        "parameters, FLOPs."]),
}


@pytest.mark.parametrize("command", fast_only(list(HELP_CASES), "train", "sweep", "eval"))
def test_command_help_lists_its_own_flags_and_the_config_fields(command):
    args, needles = HELP_CASES[command]
    proc = cnnlab(*args)
    assert proc.returncode == 0, proc.stderr
    for needle in needles:
        assert needle in proc.stdout, (args, needle, proc.stdout)
    for absl_global in ("--flagfile", "--logtostderr", "--helpfull", "--only_check_args", "jax_"):
        assert absl_global not in proc.stdout, (args, absl_global)
    assert ("config fields" in proc.stdout) == (args[0] in ("train", "sweep", "summary") and "report" not in args)


# --------------------------------------------------------------------------- user errors


def test_a_typo_override_is_one_clean_line_and_verbose_shows_the_traceback(tmp_path):
    args = train_args(tmp_path / "run", "--config.optimzer.learning_rate=0.1")
    proc = cnnlab(*args)
    assert_clean_error(proc, "unknown config key 'optimzer' in --config.optimzer.learning_rate "
                       "(did you mean 'optimizer'?)", code=2)
    assert "\\n" not in proc.stderr
    assert not (tmp_path / "run").exists()
    # the commonest typo, a top-level key: one plain line too (it used to print a garbled repr)
    top = cnnlab(*train_args(tmp_path / "run", "--config.num_epoch=1"))
    assert_clean_error(top, "cnnlab train: error: unknown config key 'num_epoch' in --config.num_epoch "
                       "(did you mean 'num_epochs'?)", code=2)
    assert "\\" not in top.stderr
    typo = cnnlab("trian")
    assert typo.returncode == 2 and "unknown command 'trian' (did you mean 'train'?)" in typo.stderr
    for verbose in (cnnlab(*args, "--verbose"), cnnlab(*args, env={"CNNLAB_VERBOSE": "1"})):
        assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr


def test_model_arguments_and_several_typed_fields_are_overridable(tmp_path):
    # head_dropout is not set by the smoke config; image_size is an int there, set to a pair here.
    run = tmp_path / "run"
    proc = cnnlab(*train_args(run, "--config.num_epochs=1", "--config.model.kwargs.head_dropout=0.25",
                              "--config.data.image_size=(16,12)", "--config.model.kwargs.global_pool", "True"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["model"]["kwargs"]["head_dropout"] == 0.25 and recorded["model"]["kwargs"]["global_pool"] is True
    assert recorded["data"]["image_size"] == [16, 12] and recorded["model"]["kwargs"]["widths"] == [8]
    assert_clean_error(cnnlab(*train_args(tmp_path / "typo", "--config.model.kwargs.widthz=(8,)")),
                       "unknown config key 'model.kwargs.widthz' (did you mean 'model.kwargs.widths'?)", code=2)
    assert_clean_error(cnnlab(*train_args(tmp_path / "bad", "--config.data.image_size=(16,0)")),
                       "config key 'data.image_size'", code=2)


def test_bad_values_a_missing_config_and_missing_data_are_clean_errors(tmp_path):
    assert_clean_error(cnnlab(*train_args(tmp_path, "--config.num_epochs=0")),
                       "config key 'num_epochs': invalid value 0 (must be >= 1)", code=2)
    assert_clean_error(cnnlab("train", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path}"),
                       "config file", "nope.py", "not found", code=2)
    assert_clean_error(cnnlab("eval"), "--workdir", code=2)
    (tmp_path / "bad_sweep.py").write_text(
        f"from cnnlab import sweep\ndef get_config():\n    return sweep.config_from_file({SMOKE!r})\n"
        "def get_sweep():\n    return sweep.Sweep(grid=sweep.product({'optimizer.learning_rate': []}), metric='val/accuracy')\n")
    assert_clean_error(cnnlab("sweep", f"--config={tmp_path / 'bad_sweep.py'}", f"--workdir={tmp_path / 'sw'}"),
                       "Grid values for 'optimizer.learning_rate' are an empty list", code=1)
    missing = tmp_path / "no_such_data"
    assert_clean_error(cnnlab(*train_args(tmp_path / "run", "--config.data.source=folder",
                                          f"--config.data.data_dir={missing}")),
                       f"{missing} does not exist", code=1)


def test_disk_errors_name_the_path_and_what_to_do():
    full = RuntimeError("checkpoint save failed")
    full.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/a/checkpoints/6")
    message, code = cli._user_error(full, "train")
    assert code == 1 and "no space left" in message and "/runs/a/checkpoints/6" in message
    assert "resumes" in message
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/r/ckpt/": Failed '
                       'writing: "/r/ckpt/d/e38": Failed to write 41559 bytes to file 21: No space left on '
                       "device [os_error_code='28']")
    message, code = cli._user_error(orbax, "train")
    assert code == 1 and message.startswith("no space left on the device writing /r/ckpt/d/e38.")
    message, _ = cli._user_error(OSError(errno.EROFS, "Read-only file system", "/ro/run/x.npy"), "eval")
    assert "read-only" in message and "/ro/run/x.npy" in message and "--output_dir" in message
    assert cli._user_error(KeyError("a bug"), "train") is None  # internal errors keep their traceback
    assert cli._user_error(ValueError("raised outside cnnlab"), "train") is None


# --------------------------------------------------------------------------- Ctrl-C and resume


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A tiny run stopped by SIGINT after its first epoch, then resumed to the end."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    # A Ctrl-C in a terminal: the child must not inherit an ignored SIGINT (a shell's background
    # job, e.g. `nohup bash -c 'pytest ...' &`, ignores it, and Python then keeps ignoring it).
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", *train_args(workdir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch   1/30"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    first = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)
    steps = int(re.search(r"epochs x (\d+) steps", first.stdout).group(1))
    found = re.search(r"the last checkpoint is step (\d+)", err)
    last = int(found.group(1)) if found else None
    kept = sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    epochs = (last or 0) // steps + 2
    resumed = cnnlab(*train_args(workdir, f"--config.num_epochs={epochs}", "--allow_config_change"))
    return workdir, first, last, kept, resumed


def test_ctrl_c_names_the_step_and_the_checkpoint_and_resumes(interrupted_run):
    workdir, first, last, kept, resumed = interrupted_run
    assert_clean_error(first, "cnnlab train: interrupted at step", code=130)
    step = int(re.search(r"interrupted at step (\d+) of", first.stderr).group(1))
    steps = int(re.search(r"epochs x (\d+) steps", first.stdout).group(1))
    # Ctrl-C came right after epoch 1's line: its checkpoint is kept, not cut short by orbax.
    assert last is not None and steps <= last <= step, first.stderr
    assert "orbax" not in first.stderr.lower() and "error" not in first.stderr.lower(), first.stderr
    assert "Run the same command again to resume" in first.stderr
    assert kept[-1] == last  # the checkpoint the message names is on disk
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from step {last}" in resumed.stdout and "final:" in resumed.stdout


def test_ctrl_c_before_the_first_step_says_the_command_starts_it_again(tmp_path):
    # Interrupted while the data loads or the step compiles: no step to name.
    code = ("import sys, cnnlab.train as t\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "t.train_and_evaluate = stop\n"
            "from cnnlab import cli\n"
            f"cli.main(['cnnlab', 'train', '--config={SMOKE}', '--workdir={tmp_path / 'run'}'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_clean_error(proc, "cnnlab train: interrupted before training started",
                       "the same command starts it again", code=130)


def test_a_changed_config_on_resume_is_a_clean_error(interrupted_run):
    workdir = interrupted_run[0]
    proc = cnnlab(*train_args(workdir, "--config.optimizer.learning_rate=0.5"))
    assert_clean_error(proc, "optimizer.learning_rate", "--allow_config_change", code=2)  # a config error, as the README says


# --------------------------------------------------------------------------- read-only runs


def _snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.slow
def test_eval_and_report_work_on_a_read_only_run(interrupted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run[0], run)
    for name in ("eval_best.json", "confusion_test_best.npy", "plot.png"):
        (run / name).unlink(missing_ok=True)
    before = _snapshot(run)
    if os.geteuid() != 0:
        prefix, env = [], None
        subprocess.run(["chmod", "-R", "a-w", str(run)], check=True)
    else:  # root writes through chmod: the run directory reports itself not writable instead
        prefix = ["-c", "import os, sys; real, ro = os.access, sys.argv.pop(1); os.access = lambda p, m, "
                  "**k: not (m & os.W_OK and os.path.abspath(p).startswith(ro)) and real(p, m, **k); "
                  "sys.argv[0] = 'cnnlab'; from cnnlab.cli import main; main()", str(run)]
        env = None
    try:
        def run_cli(*args):
            argv = [sys.executable, *(prefix or ["-m", "cnnlab"]), *args]
            return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)

        proc = run_cli("eval", f"--workdir={run}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "checkpoint=best" in proc.stdout and "test/accuracy=" in proc.stdout
        assert f"note: {run} is not writable" in proc.stderr and "--output_dir" in proc.stderr
        proc = run_cli("report", f"--workdir={run}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "macro avg" in proc.stdout and "not writable" in proc.stderr
        assert _snapshot(run) == before  # nothing written, nothing touched

        out = tmp_path / "out"
        proc = run_cli("eval", f"--workdir={run}", f"--output_dir={out}", "--which=latest")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert {"eval_latest.json", "confusion_test_latest.npy"} <= {p.name for p in out.iterdir()}
        proc = run_cli("report", f"--workdir={run}", f"--output_dir={out}")
        assert proc.returncode == 0 and (out / "plot.png").exists() and (out / "classification_report.txt").exists()
        assert _snapshot(run) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(run)], check=True)


# --------------------------------------------------------------------------- records kept


def test_eval_and_report_never_overwrite_a_record_unless_asked(interrupted_run, tmp_path):
    # Tests run as root here, so nothing relies on permissions: the files' sizes and times say.
    run = tmp_path / "run"
    shutil.copytree(interrupted_run[0], run)
    proc = cnnlab("eval", f"--workdir={run}")
    assert proc.returncode == 0 and (run / "eval_best.json").exists(), proc.stderr[-3000:]
    before = _snapshot(run)
    assert_clean_error(cnnlab("eval", f"--workdir={run}"),
                       f"cnnlab eval: error: {run / 'eval_best.json'} exists (and confusion_val_best.npy, "
                       "confusion_test_best.npy), and records are not overwritten unless asked: "
                       "--overwrite replaces them, --output_dir=DIR writes them elsewhere", code=2)
    assert_clean_error(cnnlab("report", f"--workdir={run}"),
                       f"{run / 'plot.png'} exists (and classification_report.json, "
                       "classification_report.txt, confusion_matrix.png)", "--overwrite", code=2)
    assert _snapshot(run) == before  # nothing rewritten

    proc = cnnlab("eval", f"--workdir={run}", "--overwrite")
    assert proc.returncode == 0 and "checkpoint=best" in proc.stdout, proc.stderr[-3000:]
    proc = cnnlab("report", f"--workdir={run}", "--overwrite")
    assert proc.returncode == 0 and "macro avg" in proc.stdout, proc.stderr[-3000:]
    after = _snapshot(run)
    for name in ("eval_best.json", "confusion_test_best.npy", "plot.png", "classification_report.txt",
                 "confusion_matrix.png"):
        assert after[run / name] != before[run / name], name  # written anew when asked
    assert after[run / "metrics.jsonl"] == before[run / "metrics.jsonl"]


# --------------------------------------------------------------------------- moved data


@pytest.mark.slow
def test_eval_finds_moved_data_through_data_dir_or_caltech101_dir(tmp_path):
    from cnnlab.data.testing import make_tree

    tree = make_tree(tmp_path / "tree", {"a": 12, "b": 12})
    run = tmp_path / "run"
    proc = cnnlab(*train_args(run, "--config.num_epochs=1", "--config.data.source=folder",
                              f"--config.data.data_dir={tree}", "--config.data.classes=all",
                              "--config.batch_size=8", "--config.data.val_fraction=0.25"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = tmp_path / "moved"
    tree.rename(moved)

    assert_clean_error(cnnlab("eval", f"--workdir={run}", env={"CALTECH101_DIR": ""}),
                       f"the run's data.data_dir {tree} does not exist (moved?): point --data_dir=DIR "
                       "(or $CALTECH101_DIR) at where its images are now", code=1)
    assert not (run / "eval_best.json").exists()
    proc = cnnlab("eval", f"--workdir={run}", f"--data_dir={moved}", env={"CALTECH101_DIR": ""})
    assert proc.returncode == 0 and "test/accuracy=" in proc.stdout, proc.stderr[-3000:]
    first = json.loads((run / "eval_best.json").read_text())
    out = tmp_path / "out"
    proc = cnnlab("eval", f"--workdir={run}", f"--output_dir={out}", env={"CALTECH101_DIR": str(moved)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: the run's data.data_dir {tree} does not exist; reading $CALTECH101_DIR={moved}" in proc.stderr
    assert json.loads((out / "eval_best.json").read_text()) == first
