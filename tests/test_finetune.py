"""Fine-tuning: init_from a run directory or a Keras file, frozen parameters, learning-rate
multipliers, the weight-decay mask, exact resume and packing of fine-tuned runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import epoch_records, tiny_config, train_packed_and_alone

from cnnlab.schema import ConfigError
from cnnlab.train import optim, rundir, train_and_evaluate, validate_config
from cnnlab.train import trainer as trainer_lib
from cnnlab.train.experiment import load_trained
from cnnlab.train.trainer import train

BODY = ("Conv2D_0/.*", "Dense_0/.*")


def _flat(tree):
    return {optim.path_name(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny simple_cnn run on 4 classes (one epoch)."""
    workdir = str(tmp_path_factory.mktemp("source"))
    config = tiny_config()
    config.num_epochs = 1
    train_and_evaluate(config, workdir)
    return workdir


def _finetune_config(init_from, *, classes=3, **fields):
    config = tiny_config()
    config.num_epochs = 1
    config.seed = 1
    config.data.synthetic_num_classes = classes
    config.init_from = init_from
    for key, value in fields.items():
        config[key] = value
    return config


def test_init_from_a_run_with_other_classes_loads_the_body_and_reinitializes_the_head(
        source_run, tmp_path, capsys):
    config = _finetune_config(source_run, freeze=BODY)
    state, _ = train(config, str(tmp_path))
    source = _flat(load_trained(source_run, which="best").variables["params"])
    params = _flat(state.params)
    for path in ("Conv2D_0/kernel", "Conv2D_0/bias", "Dense_0/kernel", "Dense_0/bias"):
        np.testing.assert_array_equal(params[path], source[path])  # loaded, then frozen: bit-equal
    assert params["Dense_1/kernel"].shape == (16, 3) != source["Dense_1/kernel"].shape
    record = json.loads((tmp_path / "init_from.json").read_text())
    assert record["kind"] == "run" and record["which"] == "best" and record["matched_by"] == "path"
    assert set(record["reinitialized"]) == {"params/Dense_1/kernel", "params/Dense_1/bias"}
    assert record["reinitialized"]["params/Dense_1/kernel"] == "shape [16, 3] here, [16, 4] in the source"
    assert len(record["loaded"]) == 4
    out = capsys.readouterr().out
    assert f"init_from {source_run} (best checkpoint, step" in out
    assert "loaded 4 of 6 variables (by path); kept fresh: params/Dense_1/bias, params/Dense_1/kernel" in out
    assert json.loads((tmp_path / "config.json").read_text())["init_from"] == source_run


def test_init_from_a_keras_file_and_a_weights_file(source_run, tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    pytest.importorskip("keras")
    from cnnlab import interop

    trained = load_trained(source_run, which="latest")
    keras_model = interop.to_keras(trained.model, trained.variables, (16, 16, 3))
    keras_file, weights_file = str(tmp_path / "net.keras"), str(tmp_path / "net.weights.h5")
    keras_model.save(keras_file)
    keras_model.save_weights(weights_file)
    source = _flat(trained.variables["params"])

    # a .keras file, another number of classes: matched by layer order, the head kept fresh
    state, _ = train(_finetune_config(keras_file, freeze=BODY), str(tmp_path / "keras"))
    params = _flat(state.params)
    for path in ("Conv2D_0/kernel", "Dense_0/bias"):
        np.testing.assert_array_equal(params[path], source[path])
    record = json.loads((tmp_path / "keras" / "init_from.json").read_text())
    assert record["kind"] == "keras" and record["matched_by"] == "layer order"
    assert record["loaded"]["params/Conv2D_0/kernel"] == "params/layers_0/kernel"
    assert set(record["reinitialized"]) == {"params/Dense_1/kernel", "params/Dense_1/bias"}

    # weights only: the config's own model (4 classes); everything frozen keeps every weight
    state, _ = train(_finetune_config(weights_file, classes=4, freeze=(".*",)), str(tmp_path / "h5"))
    for path, value in _flat(state.params).items():
        np.testing.assert_array_equal(value, source[path])
    record = json.loads((tmp_path / "h5" / "init_from.json").read_text())
    assert record["kind"] == "keras_weights" and not record["reinitialized"]


def test_init_from_a_cnnlab_export_takes_its_network_without_the_preprocessing(source_run, tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    pytest.importorskip("keras")
    from cnnlab import interop

    exported = str(tmp_path / "export.keras")
    interop.export_keras(source_run, exported, which="latest")  # Resizing, Rescaling, model, softmax
    state, _ = train(_finetune_config(exported, freeze=BODY), str(tmp_path / "run"))
    source = _flat(load_trained(source_run, which="latest").variables["params"])
    params = _flat(state.params)
    for path in ("Conv2D_0/kernel", "Conv2D_0/bias", "Dense_0/kernel", "Dense_0/bias"):
        np.testing.assert_array_equal(params[path], source[path])
    record = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert record["kind"] == "keras" and len(record["loaded"]) == 4
    assert set(record["reinitialized"]) == {"params/Dense_1/kernel", "params/Dense_1/bias"}


@pytest.mark.slow
def test_frozen_normalization_layers_keep_their_statistics(tmp_path):
    config = _finetune_config("", classes=4, freeze=("Conv2D_.*", "BatchNormalization_[01]/.*"),
                              freeze_batch_stats=True)
    config.model.name = "stridednet"
    config.model.kwargs = {"widths": (8,), "dense_units": 16, "stem_filters": 4}
    first = jax.device_get(train(config, str(tmp_path / "a"))[0])
    config.num_epochs = 2  # a fresh run: the same start, one more epoch
    second = jax.device_get(train(config, str(tmp_path / "b"))[0])
    stats_a, stats_b = _flat(first.batch_stats), _flat(second.batch_stats)
    # conv and BN frozen: BN 0 and 1 keep their statistics; the dense layer's BN (2) learns
    for path in ("BatchNormalization_0/moving_mean", "BatchNormalization_1/moving_variance"):
        np.testing.assert_array_equal(stats_a[path], stats_b[path])
        assert np.all(stats_a[path] == (0.0 if "mean" in path else 1.0))
    assert not np.array_equal(stats_a["BatchNormalization_2/moving_mean"],
                              stats_b["BatchNormalization_2/moving_mean"])
    assert not np.array_equal(_flat(first.params)["Dense_0/kernel"], _flat(second.params)["Dense_0/kernel"])


# ---------------------------------------------------------------------------------------------
# The optimizer: frozen parameters, multipliers, the weight-decay mask
# ---------------------------------------------------------------------------------------------


PARAMS = {"Conv2D_0": {"kernel": jnp.full((3, 3, 2, 4), 0.5), "bias": jnp.full((4,), 0.5)},
          "Dense_0": {"kernel": jnp.full((4, 2), 0.5), "bias": jnp.full((2,), 0.5)}}


def _updates(config, grads=None, steps=3):
    config = validate_config(config)
    tx = optim.make_optimizer(config, 10)
    grads = grads or jax.tree_util.tree_map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), PARAMS)
    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return _flat(params)


def _opt_config(**optimizer):
    config = tiny_config()
    for key, value in optimizer.items():
        config.optimizer[key] = value
    return config


def test_freeze_and_lr_multipliers_scale_each_parameters_updates():
    base = _updates(_opt_config(weight_decay=0.1, grad_clip_norm=1.0))
    frozen_config = _opt_config(weight_decay=0.1, grad_clip_norm=1.0)
    frozen_config.freeze = ("Conv2D_0/.*",)
    frozen = _updates(frozen_config)
    zero = _updates(_opt_config(weight_decay=0.1, grad_clip_norm=1.0,
                                lr_multipliers=(("Conv2D_0/.*", 0.0),)))
    for path in ("Conv2D_0/kernel", "Conv2D_0/bias"):  # exactly no change, decay included
        np.testing.assert_array_equal(frozen[path], np.asarray(PARAMS["Conv2D_0"][path.split("/")[1]]))
    for path in frozen:
        np.testing.assert_array_equal(zero[path], frozen[path])  # factor 0 is freezing
    assert not np.array_equal(frozen["Dense_0/kernel"], base["Dense_0/kernel"])  # clip norm without them

    one = _updates(_opt_config(), steps=1)
    doubled = _updates(_opt_config(lr_multipliers=(("Dense_0/kernel", 2.0), ("Dense_0/.*", 3.0))), steps=1)
    start = _flat(PARAMS)
    # (compared after the parameter's own rounding: 0.5 + u)
    np.testing.assert_allclose(doubled["Dense_0/kernel"] - start["Dense_0/kernel"],
                               2 * (one["Dense_0/kernel"] - start["Dense_0/kernel"]), rtol=1e-4)  # first pair wins
    np.testing.assert_allclose(doubled["Dense_0/bias"] - start["Dense_0/bias"],
                               3 * (one["Dense_0/bias"] - start["Dense_0/bias"]), rtol=1e-4)
    np.testing.assert_array_equal(doubled["Conv2D_0/kernel"], one["Conv2D_0/kernel"])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_skips_one_dimensional_parameters_by_default(name):
    zero = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)  # decay alone moves the parameters
    decayed = {}
    for mask in ("default", "all"):
        config = _opt_config(name=name, weight_decay=0.1, weight_decay_mask=mask, learning_rate=0.5)
        if name == "sgd":
            config.optimizer.sgd.momentum = 0.0
        decayed[mask] = _updates(config, zero, steps=1)
    for path in ("Conv2D_0/kernel", "Dense_0/kernel"):
        assert np.all(decayed["default"][path] < 0.5) and np.all(decayed["all"][path] < 0.5)
    for path in ("Conv2D_0/bias", "Dense_0/bias"):
        assert np.all(decayed["default"][path] == 0.5) and np.all(decayed["all"][path] < 0.5)


def test_a_run_recorded_before_the_weight_decay_mask_resumes_with_all(tmp_path):
    config = validate_config(_opt_config(weight_decay=1e-3))
    recorded = config.to_dict()
    del recorded["optimizer"]["weight_decay_mask"]  # config.json of a run from before the field
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    resumed, changed = rundir.with_legacy_values(str(tmp_path), config)
    assert changed == {"optimizer.weight_decay_mask": "all"}
    assert resumed.optimizer.weight_decay_mask == "all"
    assert rundir.record_config(str(tmp_path), resumed.to_dict(), step=3) == {}  # no change
    # config.json stays as recorded, so every later resume reads it the same way
    assert "weight_decay_mask" not in json.loads((tmp_path / "config.json").read_text())["optimizer"]
    fresh, changed = rundir.with_legacy_values(str(tmp_path / "new"), config)
    assert fresh.optimizer.weight_decay_mask == "default" and not changed


# ---------------------------------------------------------------------------------------------
# Errors before anything is written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"freeze": ("Conv2D_0/[",)}, r"config key 'freeze': invalid value .*not a regular expression"),
    ({"freeze": ("Conv2D_0",)}, r"config key 'freeze': 'Conv2D_0' matches no parameter path .*Conv2D_0/bias"),
    ({"init_from": "/nonexistent/run"}, r"config key 'init_from': '/nonexistent/run' does not exist"),
    ({"init_from": "weights.npz"}, r"config key 'init_from': 'weights.npz' does not exist"),
])
def test_bad_fine_tuning_fields_are_refused_before_anything_is_written(tmp_path, fields, message):
    config = tiny_config()
    for key, value in fields.items():
        config[key] = value
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(ConfigError, match=r"'optimizer.lr_multipliers': .*factor -1"):
        validate_config(_opt_config(lr_multipliers=(("Dense_0/.*", -1.0),)))


# ---------------------------------------------------------------------------------------------
# Resume and packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_fine_tuned_run_resumes_exactly(source_run, tmp_path, monkeypatch):
    config = _finetune_config(source_run, classes=4, freeze=("Conv2D_0/.*",))  # 3 steps an epoch
    config.num_epochs = 2
    config.optimizer.lr_multipliers = (("Dense_1/.*", 5.0),)
    train_and_evaluate(config, str(tmp_path / "straight"))

    def interrupt(pid, sig):
        raise KeyboardInterrupt

    monkeypatch.setenv("CNNLAB_FAULT_KILL_AT_STEP", "5")  # mid epoch 2, after the step-4 checkpoint
    monkeypatch.setattr(trainer_lib.os, "kill", interrupt)
    with pytest.raises(trainer_lib.TrainingInterrupted, match="the last checkpoint is step 4"):
        train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.undo()
    init_record = (tmp_path / "resumed" / "init_from.json").read_text()
    train_and_evaluate(config, str(tmp_path / "resumed"))  # restores step 4, not init_from
    assert (tmp_path / "resumed" / "init_from.json").read_text() == init_record
    a, b = epoch_records(str(tmp_path / "straight")), epoch_records(str(tmp_path / "resumed"))
    assert [r["epoch"] for r in b] == [1, 2]
    assert a[-1] == b[-1]  # every final metric, exactly


@pytest.mark.slow
def test_packed_fine_tuned_trials_equal_each_alone(source_run, tmp_path):
    configs = []
    for lr in (1e-3, 3e-3):
        config = _finetune_config(source_run, freeze=("Conv2D_0/.*",))
        config.num_epochs = 2
        config.optimizer.learning_rate = lr
        configs.append(config)
    records = train_packed_and_alone(configs, tmp_path)
    assert records[0][-1]["train/loss"] != records[1][-1]["train/loss"]
    for k in range(2):
        assert (tmp_path / f"packed{k}" / "init_from.json").exists()
