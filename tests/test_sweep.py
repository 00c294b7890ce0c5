"""Sweeps end to end on synthetic data: a packed grid with failing trials, packed-vs-alone
equality, resume after SIGKILL, and workers sharing one study (SQLite; PostgreSQL on loopback
where its binaries are installed) without ever running a trial twice."""

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

from cnnlab import sweep
from cnnlab.sweep import engine
from cnnlab.sweep.files import load_module
from cnnlab.train import group as packed
from cnnlab.train import train_and_evaluate, validate_config
from cnnlab.train.writers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")
# Compiled programs are shared between these tests' processes (identical configs compile once).
JAX_CACHE = os.path.join(tempfile.gettempdir(), "cnnlab-test-jax-cache")
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}

TINY = """
c.num_epochs = 2
c.data.image_size = 16
c.data.synthetic_per_class = 40
c.model.kwargs.widths = (8,)
c.model.kwargs.dense_units = 16
c.progress = False
c.checkpoint.every_steps = 2
"""

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


def tiny_config():
    c = sweep.config_from_file(SMOKE)
    exec(TINY, {"c": c})
    return c


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
    optuna = engine._optuna()
    return optuna.load_study(study_name="sweep", storage=url)


def attempts(workdir, slot):
    path = pathlib.Path(workdir) / "trials" / f"{slot:04d}" / "sweep_attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def epoch_records(trial_dir):
    return [r for r in read_metrics(os.path.join(trial_dir, "metrics.jsonl")) if r["kind"] == "epoch"]


def assert_same_epoch_records(packed_dir, alone_dir, tag):
    """A packed trial's epoch records equal those of the same config trained alone (epochs 1
    and 2, same keys, floats within rel 1e-4); returns the packed records."""
    packed, alone = epoch_records(packed_dir), epoch_records(alone_dir)
    assert [r["epoch"] for r in packed] == [r["epoch"] for r in alone] == [1, 2]
    for p, a in zip(packed, alone):
        assert p.keys() == a.keys()
        for key in a:
            expected = pytest.approx(a[key], rel=1e-4, abs=1e-6) if isinstance(a[key], float) else a[key]
            assert p[key] == expected, (tag, p["epoch"], key)
    return packed


def assert_each_slot_ran_once(workdir, url, n):
    from optuna.trial import TrialState

    trials = load_study(url).get_trials()
    real = [t for t in trials if engine.DUPLICATE not in t.user_attrs]
    assert sorted(t.user_attrs[engine.SLOT] for t in real) == list(range(n))
    assert all(t.state == TrialState.COMPLETE for t in real), [(t.number, t.state) for t in real]
    for dup in (t for t in trials if engine.DUPLICATE in t.user_attrs):
        assert dup.state == TrialState.FAIL and engine.WORKDIR not in dup.user_attrs  # never trained
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
    study = load_study(engine.default_storage(str(workdir)))
    by_slot = {t.user_attrs[engine.SLOT]: t for t in study.get_trials()}
    assert sorted(by_slot) == [0, 1, 2, 3]
    assert [by_slot[i].state.name for i in range(4)] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL"]
    assert "NonFiniteLossError" in by_slot[1].user_attrs[engine.ERROR]
    assert "batch_size=4096 exceeds" in by_slot[3].user_attrs[engine.ERROR]
    assert [by_slot[i].user_attrs[engine.PACKED] for i in range(4)] == [3, 3, 3, 1]
    assert summary["counts"] == {"COMPLETE": 2, "FAIL": 2}

    for slot in GOOD:  # each trial is an ordinary run directory
        d = workdir / "trials" / f"{slot:04d}"
        for name in ("config.json", "config.py", "classes.json", "metrics.jsonl", "plot.png",
                     "classification_report.json", "sweep_attempts.jsonl"):
            assert (d / name).exists(), (slot, name)
        assert [r["epoch"] for r in epoch_records(str(d))] == [1, 2]
        assert (d / "checkpoints" / "latest" / "6").is_dir()
        assert by_slot[slot].value == pytest.approx(epoch_records(str(d))[-1]["test/accuracy"])
        assert len(by_slot[slot].intermediate_values) == 2
        config = validate_config(load_module(str(d / "config.py")).get_config())
        assert config.optimizer.learning_rate == POINTS.points[slot]["optimizer.learning_rate"]

    for name in ("trials.csv", "trials.md", "params.png", "curves.png", "best_config.py", "summary.json",
                 "sweep.json", "study.db"):
        assert (workdir / name).exists(), name
    lines = (workdir / "trials.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert len(lines) == 5 and header[:4] == ["trial", "slot", "state", "test/accuracy"]
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


def test_packed_trials_differing_in_dropout_and_augmentation_equal_each_alone(tmp_path):
    # Dropout rates (0 in one trial) and augmentation strengths (a rotation of 0 against 15
    # degrees, zoom, a fractional against a pixel shift, mixup alpha) are traced per trial.
    base = tiny_config()
    base.model.name = "stridednet"
    base.model.kwargs = {"widths": (8,), "dense_units": 16, "stem_filters": 4, "weight_decay": 1e-4}
    base.data.image_size = 24
    base.data.augment.mixup_alpha = 0.2
    points = [
        {"model.kwargs.dropout": 0.0, "model.kwargs.head_dropout": 0.5, "data.augment.rotation_range": 0.0,
         "data.augment.zoom_range": 0.1, "data.augment.width_shift_range": 0.1, "data.augment.mixup_alpha": 0.2},
        {"model.kwargs.dropout": 0.3, "model.kwargs.head_dropout": 0.0, "data.augment.rotation_range": 15.0,
         "data.augment.zoom_range": 0.0, "data.augment.width_shift_range": 2.0, "data.augment.mixup_alpha": 0.4},
    ]
    configs = [sweep.apply_point(base, p) for p in points]
    assert sorted(packed._varying(configs)) == [
        "augment/mixup_alpha", "augment/rotation_range", "augment/width_shift_range", "augment/zoom_range",
        "model/dropout", "model/head_dropout"]
    outcomes, _ = packed.train_packed(configs, [str(tmp_path / f"packed{k}") for k in range(2)])
    assert all(o.error is None for o in outcomes)
    for k, config in enumerate(configs):
        train_and_evaluate(config, str(tmp_path / f"alone{k}"))
        assert_same_epoch_records(str(tmp_path / f"packed{k}"), str(tmp_path / f"alone{k}"), k)


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

    study = load_study(engine.default_storage(str(workdir)))
    real = {}
    for t in study.get_trials():
        real.setdefault(t.user_attrs[engine.SLOT], []).append(t)
    assert [len(real[s]) for s in range(4)] == [1, 1, 2, 2]  # one retry for each interrupted trial
    for s in range(4):
        assert real[s][-1].state.name == "COMPLETE"
        assert len(attempts(workdir, s)) == (1 if s < 2 else 2)
        assert [r["epoch"] for r in epoch_records(str(workdir / "trials" / f"{s:04d}"))] == [1, 2]
    rows = (workdir / "trials.csv").read_text().splitlines()[1:]
    assert sorted(int(r.split(",")[1]) for r in rows) == [0, 1, 2, 3]


# --- workers -------------------------------------------------------------------------------------


def test_two_local_workers_share_one_study_and_never_run_a_trial_twice(tmp_path):
    path = write_sweep_file(tmp_path / "workers.py", [3e-3, 1e-3, 2e-3, 5e-4], pack=2)
    workdir = tmp_path / "w"
    proc = run_cli(f"--config={path}", f"--workdir={workdir}", "--workers=2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    real = assert_each_slot_ran_once(str(workdir), engine.default_storage(str(workdir)), 4)
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
    owner = {**engine.this_owner(), "pid": proc.pid, "start": "0"}
    assert engine.owner_is_dead(owner)
    assert not engine.owner_is_dead(engine.this_owner())
    assert not engine.owner_is_dead({**engine.this_owner(), "host": "elsewhere"})


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
    trials = load_study(engine.default_storage(str(tmp_path))).get_trials()
    for t in trials:
        assert 1e-4 <= t.params["optimizer.learning_rate"] <= 1e-2
        assert t.params["model.kwargs.widths"] in ("[8]", "[4]")
        assert tuple(t.user_attrs[engine.VALUES]["model.kwargs.widths"]) in ((8,), (4,))
    assert (tmp_path / "params.png").exists() and (tmp_path / "best_config.py").exists()


# --- trial axis over several devices ------------------------------------------------------------

SHARDED_WORKER = r'''
import json, sys
import jax
from cnnlab import sweep
from cnnlab.train import group as packed
from cnnlab.sweep.space import apply_point

smoke, tiny, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = sweep.config_from_file(smoke)
exec(tiny, {"c": base})
configs = [apply_point(base, {"optimizer.learning_rate": lr}) for lr in (3e-3, 1e-3)]
prog = packed.build_packed(configs)
leaf = jax.tree_util.tree_leaves(prog.states.params)[0]
rows = sorted({s.data.shape[0] for s in leaf.addressable_shards})  # trials held per device
devices = sorted(d.id for d in leaf.sharding.device_set)
outcomes, _ = packed.train_packed(configs, [f"{out}/t0", f"{out}/t1"])
assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
print(json.dumps({"devices": devices, "rows": rows}))
'''


def test_packed_trials_shard_over_devices_and_match_one_device(tmp_path):
    """A pack of 2 trials on 2 (forced CPU) devices holds one trial per device, and each trial's
    metrics equal the same pack on one device."""
    runs = {}
    for n in (1, 2):
        env = {**os.environ, **CACHE_ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        out = tmp_path / f"d{n}"
        proc = subprocess.run([sys.executable, "-c", SHARDED_WORKER, SMOKE, TINY, str(out)], env=env,
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info == {"devices": list(range(n)), "rows": [2 // n]}, info
        runs[n] = out
    for t in ("t0", "t1"):
        one, two = epoch_records(str(runs[1] / t)), epoch_records(str(runs[2] / t))
        assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2]
        for a, b in zip(one, two):
            for key, value in a.items():
                expected = pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value
                assert b[key] == expected, (t, a["epoch"], key)
