"""Model EMA (``config.ema``): the average's arithmetic, its own evaluation metrics, selection
of the best checkpoint on them, predictions with its weights, exact resume and packing."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import epoch_records, tiny_config, train_packed_and_alone

from cnnlab import load_run
from cnnlab.schema import ConfigError
from cnnlab.sweep import apply_point
from cnnlab.train import pack_key, train_and_evaluate, validate_config
from cnnlab.train.checkpoint import Checkpoints
from cnnlab.train.experiment import load_trained
from cnnlab.train.optim import ema_params, with_ema


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_follows_the_parameters_with_its_decay(warmup):
    params = {"w": jnp.arange(4.0)}
    tx = with_ema(optax.sgd(0.1), 0.9, warmup)
    state, p, want = tx.init(params), params, np.arange(4.0)
    for t in range(1, 6):
        updates, state = tx.update({"w": jnp.ones(4) * t}, state, p)
        p = optax.apply_updates(p, updates)
        d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        want = d * want + (1 - d) * np.asarray(p["w"])
    np.testing.assert_allclose(np.asarray(ema_params(state)["w"]), want, rtol=1e-6)
    assert ema_params(optax.sgd(0.1).init(params)) is None


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    config = tiny_config()
    config.ema.decay = 0.8
    config.checkpoint.best_metric = "val_ema/accuracy"
    workdir = str(tmp_path_factory.mktemp("ema") / "run")
    train_and_evaluate(config, workdir)
    return config, workdir


def test_the_ema_is_evaluated_selected_and_predicts(ema_run):
    config, workdir = ema_run
    last = epoch_records(workdir)[-1]
    assert {f"{s}_ema/{m}" for s in ("val", "test") for m in config.metrics} <= last.keys()
    assert last["val_ema/loss"] != last["val/loss"]
    trained = load_trained(workdir)
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trained.variables["params"])
    ckpt = Checkpoints(workdir, keep=2, best_metric="val_ema/accuracy", best_mode="max")
    try:
        raw, _, _ = ckpt.restore_variables({"params": shapes, "opt_state": {"ema": shapes}})
    finally:
        ckpt.close()
    for got, ema, _plain in zip(*(jax.tree_util.tree_leaves(t) for t in
                                 (trained.variables["params"], raw["opt_state"]["ema"], raw["params"]))):
        np.testing.assert_array_equal(got, ema)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(raw["opt_state"]["ema"]),
                                                         jax.tree_util.tree_leaves(raw["params"])))
    run = load_run(workdir)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    assert np.isfinite(run.predict(images)).all()


def test_a_resume_with_the_ema_equals_the_uninterrupted_run(ema_run, tmp_path):
    config, workdir = ema_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    latest = os.path.join(resumed, "checkpoints", "latest")
    steps = sorted(int(p) for p in os.listdir(latest) if p.isdigit())
    shutil.rmtree(os.path.join(latest, str(steps[-1])))  # resume mid-epoch 2
    train_and_evaluate(config, resumed)
    assert epoch_records(resumed)[-1] == epoch_records(workdir)[-1]


@pytest.mark.slow
def test_trials_differing_in_decay_pack_and_equal_alone(tmp_path):
    base = tiny_config()
    base.ema.decay = 0.9
    configs = [apply_point(base, {"ema.decay": d}) for d in (0.9, 0.5)]
    assert len({pack_key(c) for c in configs}) == 1
    for records in train_packed_and_alone(configs, tmp_path):
        assert "val_ema/accuracy" in records[-1]


def test_ema_metrics_need_an_ema():
    config = tiny_config()
    config.checkpoint.best_metric = "val_ema/accuracy"
    with pytest.raises(ConfigError, match="'checkpoint.best_metric': invalid value 'val_ema/accuracy'"):
        validate_config(config)
    config.ema.decay = 1.0
    with pytest.raises(ConfigError, match="'ema.decay'"):
        validate_config(config)
