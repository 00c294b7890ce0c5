"""Many devices and many processes through one code path; batch-size validation; gradient
accumulation; steps per dispatch; no recompilation."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnnlab import models
from cnnlab.train.experiment import resolve_batch_size
from cnnlab.train.steps import create_train_state, make_train_step
from cnnlab.train.writers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The smoke config in a fresh process (joined to others when given an address), overridden.
_PRELUDE = """
import json, sys
import numpy as np
sys.path.insert(0, {configs!r})
from cnnlab.train import distributed
distributed.initialize({address!r}, {nproc}, {pid})
import jax
import smoke
config = smoke.get_config()
config.progress = False
config.num_epochs = 2
{overrides}
"""

# Trains it and prints the final metrics and a parameter digest.
_SCRIPT = _PRELUDE + """
from cnnlab.train.trainer import train
state, final = train(config, {workdir!r})
leaves = jax.tree_util.tree_leaves(state.params)
digest = [float(np.abs(np.asarray(x.addressable_data(0))).sum()) for x in leaves]
print("RESULT " + json.dumps({{"final": final, "digest": digest,
                              "devices": jax.device_count(), "processes": jax.process_count()}}))
"""


# SGD keeps float-level differences between device layouts float-level (Adam's normalized
# steps amplify them for near-zero gradients), so parameters can be compared tightly. At a
# learning rate of 0.05 the smoke run is chaotic (a 1e-7 difference grows tenfold a step);
# at 0.02 one and eight devices stay within 1e-6 of each other.
_SGD = 'config.optimizer.name = "sgd"; config.optimizer.learning_rate = 0.02'


def _launch(workdir, *, env_extra=None, address=None, nproc=1, pid=0, overrides=_SGD, script=_SCRIPT):
    code = script.format(
        configs=str(ROOT / "configs"), address=address, nproc=nproc, pid=pid,
        workdir=str(workdir), overrides=overrides,
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc, timeout=600):
    import json

    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _epochs(workdir):
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "epoch"]


def _assert_close_records(a, b, rtol):
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if isinstance(ra[key], float):
                # Accuracies are counts: a float-level difference may flip one borderline image.
                atol = 0.02 if "accuracy" in key else 1e-5
                np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.slow
def test_eight_devices_match_one_device_with_the_same_global_batch(tmp_path):
    one = _launch(tmp_path / "one")
    eight = _launch(tmp_path / "eight",
                    env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    r1, r8 = _result(one), _result(eight)
    assert (r1["devices"], r8["devices"]) == (1, 8)
    _assert_close_records(_epochs(tmp_path / "one"), _epochs(tmp_path / "eight"), rtol=2e-3)
    np.testing.assert_allclose(r1["digest"], r8["digest"], rtol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model_and_agree_on_its_parameters(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    procs = [_launch(tmp_path / "run", address=address, nproc=2, pid=i) for i in range(2)]
    r0, r1 = [_result(p) for p in procs]
    assert r0["processes"] == r1["processes"] == 2
    assert r0["devices"] == 2
    assert r0["digest"] == r1["digest"]  # identical replicated parameters
    assert r0["final"] == r1["final"]
    # Only process 0 wrote the run's files; the checkpoint is complete and single.
    records = _epochs(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    # The 2-process run equals a 1-process run with the same global batch.
    single = _launch(tmp_path / "single")
    rs = _result(single)
    np.testing.assert_allclose(rs["digest"], r0["digest"], rtol=1e-3)


# Two packed trials (learning rates 0.02 and 0.01) trained by one or two processes.
_PACK_SCRIPT = _PRELUDE + """
from cnnlab.schema import copy_config
from cnnlab.train import train_trials
other = copy_config(config)
other.optimizer.learning_rate = 0.01
outcomes, _ = train_trials([config, other], [{workdir!r} + "/t0", {workdir!r} + "/t1"])
print("RESULT " + json.dumps({{"final": [o.metrics for o in outcomes],
                              "errors": [repr(o.error) for o in outcomes if o.error],
                              "processes": jax.process_count()}}))
"""


@pytest.mark.slow
def test_two_processes_train_a_pack_and_match_one_process(tmp_path):
    """Packs work with several processes: the batch axis is split over them as in a single run."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [_launch(tmp_path / "two", address=address, nproc=2, pid=i, script=_PACK_SCRIPT)
             for i in range(2)]
    r0, r1 = [_result(p) for p in procs]
    assert r0["processes"] == 2 and not r0["errors"] and r0["final"] == r1["final"]
    single = _result(_launch(tmp_path / "one", script=_PACK_SCRIPT))
    for t in ("t0", "t1"):
        _assert_close_records(_epochs(tmp_path / "one" / t), _epochs(tmp_path / "two" / t), rtol=2e-3)
    assert r0["final"][0] != r0["final"][1]  # the two trials really differ
    assert single["final"][0]["epoch"] == 2


def test_batch_sizes_must_split_over_devices():
    config = ml_collections.ConfigDict({"batch_size": 30, "eval_batch_size": 64, "per_device_batch_size": 0})
    with pytest.raises(ValueError, match="batch_size=30 is not divisible by the 8 devices"):
        resolve_batch_size(config, 8)
    config.per_device_batch_size = 4
    assert resolve_batch_size(config, 8).batch_size == 32
    config.eval_batch_size = 60
    with pytest.raises(ValueError, match="eval_batch_size=60"):
        resolve_batch_size(config, 8)


def _params_after(tx, batches):
    model = models.get_model("simple_cnn", num_classes=3, widths=(4,), dense_units=8, head_dropout=0.0)
    state = create_train_state(model, tx, seed=0, image_shape=(8, 8, 3))
    step = jax.jit(make_train_step(
        model, tx, num_classes=3,
        preprocess=lambda k, x, y: (x.astype(jnp.float32) / 255, jax.nn.one_hot(y, 3)),
        constraints={},
    ))
    for batch in batches:
        state, _ = step(state, batch)
    return state.params


def test_gradient_accumulation_equals_the_large_batch_update():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 3, 16).astype(np.int32)

    def batch(lo, hi):
        return {"image": jnp.asarray(images[lo:hi]), "label": jnp.asarray(labels[lo:hi]),
                "mask": jnp.ones(hi - lo, bool)}

    big = _params_after(optax.sgd(0.5), [batch(0, 16)])
    accumulated = _params_after(optax.MultiSteps(optax.sgd(0.5), every_k_schedule=2),
                                [batch(0, 8), batch(8, 16)])
    for a, b in zip(jax.tree_util.tree_leaves(big), jax.tree_util.tree_leaves(accumulated)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_steps_per_dispatch_and_accumulation_run_end_to_end(tmp_path):
    sys.path.insert(0, str(ROOT / "configs"))
    import smoke

    from cnnlab.train.trainer import train

    results = {}
    for name, overrides in {
        "plain": {},
        "scan4": {"steps_per_dispatch": 4},
        "accum2": {"grad_accum_steps": 2, "num_epochs": 2},  # half the updates: one epoch more
    }.items():
        config = smoke.get_config()
        config.progress = False
        config.num_epochs = 1
        for k, v in overrides.items():
            config[k] = v
        _, results[name] = train(config, str(tmp_path / name))
    np.testing.assert_allclose(results["plain"]["test/loss"], results["scan4"]["test/loss"], rtol=1e-4)
    assert results["accum2"]["test/accuracy"] > 0.25


@pytest.mark.slow
def test_no_recompilation_after_the_first_step(tmp_path, caplog):
    import logging

    sys.path.insert(0, str(ROOT / "configs"))
    import smoke

    from cnnlab.train.trainer import train

    config = smoke.get_config()
    config.progress = False
    config.num_epochs = 3
    config.steps_per_dispatch = 5  # 6 steps an epoch: a chunk of 5 and a single step, two programs
    with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
        train(config, str(tmp_path))
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    per_fn = {name: sum(f"jit({name})" in m for m in compiles)
              for name in ("train_step", "<lambda>", "eval_step")}
    assert per_fn["train_step"] == 1, compiles
    assert per_fn["eval_step"] == 1, compiles
