"""Sweeps end to end on synthetic data: a packed grid with failing trials, packed-vs-alone
equality, the worker's one training entry point, resume after SIGKILL, and workers sharing one
study (SQLite; PostgreSQL on loopback where its binaries are installed) without ever running a
trial twice. (Packing itself is tested in test_packing.py.)"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import jax
import pytest
from helpers import ROOT, SMOKE, TINY, assert_same_epoch_records, epoch_records, tiny_config

import cnnlab.train
from cnnlab import sweep
from cnnlab.sweep import study as studylib
from cnnlab.sweep.files import load_module
from cnnlab.train import NotPackable, TrialOutcome, train_and_evaluate, validate_config

# Compiled programs are shared between these tests' processes (identical configs compile once).
JAX_CACHE = os.path.join(tempfile.gettempdir(), "cnnlab-test-jax-cache")
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}

SWEEP_FILE = '''"""A test sweep.

    cnnlab sweep --config=this.py --workdir=w
"""
from cnnlab import sweep


def get_config():
    c = sweep.config_from_file({smoke!r})
{tiny}
    return c


def get_sweep():
    return sweep.Sweep(grid=sweep.product({{"optimizer.learning_rate": {lrs!r}}}), pack={pack})
'''


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache():
    os.makedirs(JAX_CACHE, exist_ok=True)
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
           jax.config.jax_persistent_cache_min_entry_size_bytes)
    jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])


def write_sweep_file(path, lrs, pack):
    tiny = "\n".join("    " + line for line in TINY.strip().splitlines())
    path.write_text(SWEEP_FILE.format(smoke=SMOKE, tiny=tiny, lrs=lrs, pack=pack))
    return path


def run_cli(*args, env=None):
    env = {**os.environ, **CACHE_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("CNNLAB_FAULT_KILL_AT_STEP", None)
    return subprocess.Popen([sys.executable, "-m", "cnnlab", "sweep", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def load_study(url):
    import optuna

    return optuna.load_study(study_name="sweep", storage=url)


def attempts(workdir, slot):
    path = pathlib.Path(workdir) / "trials" / f"{slot:04d}" / "sweep_attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_each_slot_ran_once(workdir, url, n):
    from optuna.trial import TrialState

    trials = load_study(url).get_trials()
    real = [t for t in trials if studylib.DUPLICATE not in t.user_attrs]
    assert sorted(t.user_attrs[studylib.SLOT] for t in real) == list(range(n))
    assert all(t.state == TrialState.COMPLETE for t in real), [(t.number, t.state) for t in real]
    for dup in (t for t in trials if studylib.DUPLICATE in t.user_attrs):
        assert dup.state == TrialState.FAIL and studylib.WORKDIR not in dup.user_attrs  # never trained
    for slot in range(n):
        runs = attempts(workdir, slot)
        assert len(runs) == 1, (slot, runs)
        assert [r["epoch"] for r in epoch_records(os.path.join(workdir, "trials", f"{slot:04d}"))] == [1, 2]
    return real


# --- one packed grid, shared by the first tests ---------------------------------------------------

POINTS = sweep.chain(
    sweep.point({"optimizer.learning_rate": 3e-3, "seed": 0, "model.kwargs.weight_decay": 1e-4}),
    sweep.point({"optimizer.learning_rate": 1e30}),  # diverges: non-finite loss inside the pack
    sweep.point({"optimizer.learning_rate": 1e-3, "seed": 1, "model.kwargs.weight_decay": 0.0}),
    sweep.point({"batch_size": 4096}),  # valid config, but the data has 120 training images
)
GOOD = (0, 2)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grid")
    # vmap_width=2: two trials vmapped, the third beside them in the same program.
    summary = sweep.run_sweep(tiny_config(), sweep.Sweep(grid=POINTS, pack=3), str(workdir),
                              poll_interval=0.1, vmap_width=2)
    return workdir, summary


def test_tiny_grid_sweep_end_to_end_records_failures_and_goes_on(grid_sweep):
    workdir, summary = grid_sweep
    study = load_study(studylib.default_storage(str(workdir)))
    by_slot = {t.user_attrs[studylib.SLOT]: t for t in study.get_trials()}
    assert sorted(by_slot) == [0, 1, 2, 3]
    assert [by_slot[i].state.name for i in range(4)] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"]
    assert "NonFiniteLossError" in by_slot[1].user_attrs[studylib.ERROR]
    assert "batch_size=4096 exceeds" in by_slot[3].user_attrs[studylib.ERROR]
    assert [by_slot[i].user_attrs[studylib.PACKED] for i in range(4)] == [3, 3, 3, 1]
    assert summary["counts"] == {"COMPLETE": 2, "FAIL": 2}

    for slot in GOOD:  # each trial is an ordinary run directory
        d = workdir / "trials" / f"{slot:04d}"
        for name in ("config.json", "config.py", "classes.json", "metrics.jsonl", "plot.png",
                     "classification_report.json", "sweep_attempts.jsonl"):
            assert (d / name).exists(), (slot, name)
        assert [r["epoch"] for r in epoch_records(str(d))] == [1, 2]
        assert (d / "checkpoints" / "latest" / "6").is_dir()
        assert by_slot[slot].value == pytest.approx(epoch_records(str(d))[-1]["val/accuracy"])
        assert len(by_slot[slot].intermediate_values) == 2
        config = validate_config(load_module(str(d / "config.py")).get_config())
        assert config.optimizer.learning_rate == POINTS.points[slot]["optimizer.learning_rate"]

    for name in ("trials.csv", "trials.md", "params.png", "curves.png", "best_config.py", "summary.json",
                 "sweep.json", "study.db"):
        assert (workdir / name).exists(), name
    lines = (workdir / "trials.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 5 and header[:4] == ["trial", "slot", "state", "val/accuracy"]  # ranked on val
    assert "test/accuracy" in header  # test metrics are still reported
    best = summary["best"]
    assert best["slot"] == int(lines[1].split(",")[1])
    assert float(lines[1].split(",")[3]) == pytest.approx(max(by_slot[i].value for i in GOOD), abs=1e-3)
    best_config = validate_config(load_module(str(workdir / "best_config.py")).get_config())
    assert best_config.optimizer.learning_rate == POINTS.points[best["slot"]]["optimizer.learning_rate"]

    # The report can be rewritten from the workdir alone.
    (workdir / "trials.md").unlink()
    again = sweep.write_report(str(workdir))
    assert again["best"] == summary["best"] and (workdir / "trials.md").exists()


def test_packed_trial_equals_the_same_config_trained_alone(grid_sweep, tmp_path):
    workdir, _ = grid_sweep
    # Trials that differ in learning rate, L2 and seed (so data order); slot 0 was vmapped (with
    # the diverging slot 1), slot 2 laid beside them in the same program.
    for slot in GOOD:
        trial = workdir / "trials" / f"{slot:04d}"
        config = load_module(str(trial / "config.py")).get_config()
        final = train_and_evaluate(config, str(tmp_path / f"alone{slot}"))
        packed = assert_same_epoch_records(str(trial), str(tmp_path / f"alone{slot}"), slot)
        assert final["test/accuracy"] == pytest.approx(packed[-1]["test/accuracy"], abs=1e-9)


def test_worker_trains_every_group_through_train_trials_and_unpacks_what_cannot_pack(tmp_path, monkeypatch):
    calls = []

    def train_trials(configs, workdirs, *, on_epoch_end=None, tag=None, vmap_width=None):
        calls.append(len(configs))
        if len(configs) > 1:
            raise NotPackable("a finished trial in the pack")
        on_epoch_end(0, 1, {"val/accuracy": 0.25})
        return [TrialOutcome(metrics={"val/accuracy": configs[0].optimizer.learning_rate})], {"total": 0.0}

    monkeypatch.setattr(cnnlab.train, "train_trials", train_trials)
    sw = sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [0.1, 0.2]}), pack=2)
    options = studylib.StorageOptions(url=studylib.default_storage(str(tmp_path)))
    assert sweep.Worker(tiny_config(), sw, str(tmp_path), options, pack=2, poll_interval=0.1).run() == 2
    assert calls == [2, 1, 1]  # one pack, refused, then each trial alone through the same entry point
    trials = sorted(load_study(options.url).get_trials(), key=lambda t: t.user_attrs[studylib.SLOT])
    assert [(t.state.name, t.value, t.user_attrs[studylib.PACKED]) for t in trials] == [
        ("COMPLETE", 0.1, 1), ("COMPLETE", 0.2, 1)]
    assert [t.intermediate_values for t in trials] == [{1: 0.25}, {1: 0.25}]


def test_a_cross_validated_trial_is_the_mean_of_its_folds_packed_together(tmp_path, monkeypatch):
    calls = []

    def train_trials(configs, workdirs, *, on_epoch_end=None, tag=None, vmap_width=None):
        calls.append([(c.data.folds, c.data.fold, os.path.relpath(w, tmp_path)) for c, w in zip(configs, workdirs)])
        outcomes = []
        for k, c in enumerate(configs):
            lr, fold = c.optimizer.learning_rate, c.data.fold
            on_epoch_end(k, 1, {"val/accuracy": lr + fold / 100})
            error = ValueError("bad fold") if (lr, fold) == (0.2, 1) else None
            outcomes.append(TrialOutcome(metrics={"val/accuracy": lr + fold / 10, "val/loss": 1.0 + fold},
                                         error=error))
        return outcomes, {"total": 0.0}

    monkeypatch.setattr(cnnlab.train, "train_trials", train_trials)
    sw = sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [0.1, 0.2]}), pack=3, folds=3)
    options = studylib.StorageOptions(url=studylib.default_storage(str(tmp_path)))
    assert sweep.Worker(tiny_config(), sw, str(tmp_path), options, pack=3, poll_interval=0.1).run() == 2
    # pack counts runs: each trial's three folds in one program, in their own directories
    assert calls == [[(3, j, f"trials/{slot:04d}/fold_{j}") for j in range(3)] for slot in (0, 1)]
    first, second = sorted(load_study(options.url).get_trials(), key=lambda t: t.user_attrs[studylib.SLOT])
    assert first.state.name == "COMPLETE" and first.value == pytest.approx(0.2)  # mean of .1, .2, .3
    assert first.user_attrs[studylib.FOLD_VALUES] == pytest.approx([0.1, 0.2, 0.3])
    assert first.user_attrs[studylib.METRICS]["val/loss"] == pytest.approx(2.0)
    assert first.intermediate_values == pytest.approx({1: 0.11})  # reported once all folds reached it
    assert second.state.name == "FAIL" and second.user_attrs[studylib.ERROR] == "fold 1: ValueError: bad fold"
    trial_config = load_module(str(tmp_path / "trials" / "0000" / "config.py")).get_config()
    assert trial_config.data.folds == 0  # the trial's config trains on the whole training split
    assert load_module(str(tmp_path / "trials" / "0000" / "fold_2" / "config.py")).get_config().data.fold == 2


@pytest.mark.slow
def test_cross_validated_sweep_end_to_end(tmp_path):
    sw = sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [3e-3]}), pack=2, folds=2)
    summary = sweep.run_sweep(tiny_config(), sw, str(tmp_path), poll_interval=0.1)
    folds = [epoch_records(str(tmp_path / "trials" / "0000" / f"fold_{j}")) for j in range(2)]
    assert summary["best"]["value"] == pytest.approx((folds[0][-1]["val/accuracy"] + folds[1][-1]["val/accuracy"]) / 2)
    table = (tmp_path / "trials.md").read_text()
    assert "mean over 2 validation folds" in table and "val/accuracy sd over folds" in table
    val = [set(json.loads((tmp_path / "trials" / "0000" / f"fold_{j}" / "split.json").read_text())
               ["splits"]["val"]["files"]) for j in range(2)]
    assert val[0] and val[1] and not val[0] & val[1]


# --- resume --------------------------------------------------------------------------------------


def test_resume_after_kill_skips_finished_trials_and_resumes_interrupted_ones(tmp_path):
    path = write_sweep_file(tmp_path / "resume.py", [3e-3, 1e-3, 2e-3, 5e-4], pack=2)
    workdir = tmp_path / "w"
    args = [f"--config={path}", f"--workdir={workdir}"]
    # Slots 0 and 1 finish as one pack; the pack of slots 2 and 3 is SIGKILLed at step 4 of 6,
    # right after its step-4 checkpoints.
    proc = run_cli(*args, env={"CNNLAB_SWEEP_FAULT_KILL_IN_SLOT": "2:4"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    assert (workdir / "trials" / "0002" / "checkpoints" / "latest" / "4").is_dir()
    assert not (workdir / "trials" / "0002" / "checkpoints" / "latest" / "6").exists()

    proc = run_cli(*args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "was interrupted" in out and "Resuming 2 packed trials from step 4" in out, out
    assert "packing trials [0, 1]" not in out  # finished trials are not run again

    study = load_study(studylib.default_storage(str(workdir)))
    real = {}
    for t in study.get_trials():
        real.setdefault(t.user_attrs[studylib.SLOT], []).append(t)
    assert [len(real[s]) for s in range(4)] == [1, 1, 2, 2]  # one retry for each interrupted trial
    for s in range(4):
        assert real[s][-1].state.name == "COMPLETE"
        assert len(attempts(workdir, s)) == (1 if s < 2 else 2)
        assert [r["epoch"] for r in epoch_records(str(workdir / "trials" / f"{s:04d}"))] == [1, 2]
    rows = (workdir / "trials.csv").read_text().splitlines()[1:]
    assert sorted(int(r.split(",")[1]) for r in rows) == [0, 1, 2, 3]


# --- workers -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_local_workers_share_one_study_and_never_run_a_trial_twice(tmp_path):
    path = write_sweep_file(tmp_path / "workers.py", [3e-3, 1e-3, 2e-3, 5e-4], pack=2)
    workdir = tmp_path / "w"
    proc = run_cli(f"--config={path}", f"--workdir={workdir}", "--workers=2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    real = assert_each_slot_ran_once(str(workdir), studylib.default_storage(str(workdir)), 4)
    assert len({t.number for t in real}) == 4
    logs = sorted((workdir / "logs").glob("worker-*.log"))
    assert len(logs) == 2 and "[sweep] started 2 workers" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's `postgresql` package); skipped where
    the binaries or psycopg2 are missing."""
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary for the PostgreSQL test")
    bins = {n: shutil.which(n) for n in ("initdb", "pg_ctl")}
    if not all(bins.values()):
        for d in sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            bins = {n: str(d / n) for n in bins}
            break
    if not all(bins.values()) or not all(os.path.exists(p) for p in bins.values()):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql")
    prefix = []
    root = tempfile.mkdtemp(prefix="cnnlab-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to run the server")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()
    subprocess.run([*prefix, bins["initdb"], "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, bins["pg_ctl"], "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, bins["pg_ctl"], "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_claim_each_trial_once(tmp_path, postgres_url):
    path = write_sweep_file(tmp_path / "pg.py", [3e-3, 1e-3, 2e-3, 5e-4], pack=2)
    workdir = tmp_path / "w"
    # The same command started twice at once, as on two machines: both race to create the study.
    args = [f"--config={path}", f"--workdir={workdir}", f"--storage={postgres_url}"]
    procs = [run_cli(*args) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_each_slot_ran_once(str(workdir), postgres_url, 4)
    assert json.loads((workdir / "sweep.json").read_text())["storage"] == postgres_url


def test_dead_local_workers_are_detected_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    owner = {**studylib.this_owner(), "pid": proc.pid, "start": "0"}
    assert studylib.owner_is_dead(owner)
    assert not studylib.owner_is_dead(studylib.this_owner())
    assert not studylib.owner_is_dead({**studylib.this_owner(), "host": "elsewhere"})


@pytest.mark.slow
def test_tpe_sweep_with_median_pruning_runs_and_reports(tmp_path):
    sw = sweep.Sweep(
        space={"optimizer.learning_rate": sweep.loguniform(1e-4, 1e-2),
               "model.kwargs.widths": sweep.choice([(8,), (4,)])},
        sampler="tpe", num_trials=4, pruner="median",
        pruner_kwargs={"n_startup_trials": 1, "n_warmup_steps": 0}, sampler_kwargs={"n_startup_trials": 2},
        pack=2,
    )
    summary = sweep.run_sweep(tiny_config(), sw, str(tmp_path), poll_interval=0.1)
    assert sum(summary["counts"].values()) == 4
    assert set(summary["counts"]) <= {"COMPLETE", "PRUNED"}
    trials = load_study(studylib.default_storage(str(tmp_path))).get_trials()
    for t in trials:
        assert 1e-4 <= t.params["optimizer.learning_rate"] <= 1e-2
        assert t.params["model.kwargs.widths"] in ("[8]", "[4]")
        assert tuple(t.user_attrs[studylib.VALUES]["model.kwargs.widths"]) in ((8,), (4,))
    assert (tmp_path / "params.png").exists() and (tmp_path / "best_config.py").exists()
