"""Training: smoke run, exact kill-and-resume, NaN handling, config validation, penalties,
constraints, checkpoint restore, reports, and a user's train step chosen by name (the models
themselves: tests/test_models.py)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import json
import pathlib
import signal
import subprocess
import sys

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config, train_packed_and_alone

from cnnlab import models, nn
from cnnlab.schema import ConfigError
from cnnlab.sweep import apply_point
from cnnlab.train import (
    NonFiniteLossError,
    evaluate,
    train_and_evaluate,
    validate_config,
)
from cnnlab.train.steps import create_train_state, make_train_step, register_step
from cnnlab.train.writers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import smoke  # noqa: E402


def smoke_config(**overrides):
    config = smoke.get_config()
    config.progress = False
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def _epoch_records(workdir):
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "epoch"]


def test_smoke_training_beats_chance_and_leaves_reports(tmp_path):
    final = train_and_evaluate(smoke_config(), str(tmp_path))
    assert final["test/accuracy"] > 0.6  # 4 classes: chance is 0.25
    for name in (
        "config.json", "classes.json", "metrics.jsonl", "plot.png", "confusion_matrix.png",
        "classification_report.txt", "classification_report.json",
    ):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tb").iterdir())
    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert report["accuracy"] == pytest.approx(final["test/accuracy"])
    assert sum(report[c]["support"] for c in json.loads((tmp_path / "classes.json").read_text())) == 80
    epochs = _epoch_records(str(tmp_path))
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]

    # Checkpoint restore gives identical metrics (and so identical predictions).
    again = evaluate(None, str(tmp_path), which="latest")
    assert again["test/loss"] == pytest.approx(final["test/loss"], rel=1e-6)
    assert again["test/accuracy"] == final["test/accuracy"]

    # The other two entry points work on the run directory (report rewrites the reports the
    # run wrote only when asked).
    (tmp_path / "plot.png").unlink()
    out = subprocess.run([sys.executable, "-m", "cnnlab", "report", f"--workdir={tmp_path}", "--overwrite"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "macro avg" in out.stdout and (tmp_path / "plot.png").exists()
    out = subprocess.run([sys.executable, "-m", "cnnlab", "eval", f"--workdir={tmp_path}", "--which=best"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    best = json.loads((tmp_path / "eval_best.json").read_text())
    # The best checkpoint is chosen on the validation split, never on the test split.
    records = _epoch_records(str(tmp_path))
    assert best["checkpoint"] == "best" and best["val/accuracy"] == max(r["val/accuracy"] for r in records)
    assert best["test/accuracy"] == next(r["test/accuracy"] for r in records
                                         if r["val/accuracy"] == best["val/accuracy"])


def _run_cli(workdir, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "train", f"--config={ROOT / 'configs' / 'smoke.py'}",
         f"--workdir={workdir}", "--config.progress=False", "--config.num_epochs=3",
         "--config.checkpoint.every_steps=2", *extra],
        cwd=ROOT, env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_sigkill_and_resume_ends_with_exactly_the_same_metrics(tmp_path):
    straight = tmp_path / "straight"
    out, _ = _run_cli(straight).communicate(timeout=300)
    assert "final:" in out, out

    killed = tmp_path / "killed"
    # A real SIGKILL, delivered mid-epoch 2 (step 11 of 21), after the step-10 checkpoint.
    env = {**os.environ, "CNNLAB_FAULT_KILL_AT_STEP": "11"}
    proc = _run_cli(killed, env=env)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    kept = [int(p.name) for p in (killed / "checkpoints" / "latest").iterdir() if p.name.isdigit()]
    assert max(kept) == 10
    out, _ = _run_cli(killed).communicate(timeout=300)
    assert "Resuming from step" in out, out
    a, b = _epoch_records(str(straight)), _epoch_records(str(killed))
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert a[-1] == b[-1]  # every final metric, exactly


def test_ctrl_c_during_an_epochs_checkpoint_save_keeps_it_and_resume_starts_after_it(
        tmp_path, monkeypatch, caplog, capsys):
    # SIGINT as the end-of-epoch checkpoint starts saving (a Ctrl-C just after "epoch 1/2"):
    # the save must finish, with no orbax error, and the resume start after that epoch.
    import logging

    import orbax.checkpoint as ocp
    from helpers import tiny_config

    from cnnlab.train.trainer import TrainingInterrupted

    config = tiny_config()  # 3 steps an epoch, a checkpoint every 2 steps
    best_steps, save = [], ocp.CheckpointManager.save

    def interrupted_save(self, step, *args, **kwargs):
        if self.directory.name == "best":
            best_steps.append(step)
        elif step in best_steps:  # the latest checkpoint at an epoch's end
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", interrupted_save)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(TrainingInterrupted) as err:
            train_and_evaluate(config, str(tmp_path))
    finally:
        signal.signal(signal.SIGINT, previous)
    epoch_end = best_steps[0]
    assert f"interrupted at step {epoch_end} " in str(err.value)
    assert f"the last checkpoint is step {epoch_end}." in str(err.value)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert kept[-1] == epoch_end
    assert not [r for r in caplog.records if "orbax" in r.pathname], caplog.text
    assert "Ctrl-C: finishing epoch 1's evaluation and checkpoint" in capsys.readouterr().err

    monkeypatch.undo()
    train_and_evaluate(config, str(tmp_path))
    assert f"Resuming from step {epoch_end} " in capsys.readouterr().out
    assert [r["epoch"] for r in _epoch_records(str(tmp_path))] == [1, 2]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = smoke_config(**{
        "optimizer.name": "sgd", "optimizer.learning_rate": 1e12, "optimizer.sgd.momentum": 0.0,
        "checkpoint.every_steps": 1, "log_every_steps": 1, "num_epochs": 2,
    })
    with pytest.raises(NonFiniteLossError, match=r"step \d+") as err:
        train_and_evaluate(config, str(tmp_path))
    assert "last good checkpoint" in str(err.value) or "no checkpoint" in str(err.value)
    latest = tmp_path / "checkpoints" / "latest"
    for step_dir in latest.glob("[0-9]*"):
        assert not step_dir.name.endswith("tmp")
    if any(latest.glob("[0-9]*")):
        # The kept checkpoint restores to finite parameters.
        from cnnlab.train.checkpoint import Checkpoints
        from cnnlab.train.experiment import build_experiment, initial_state

        exp = build_experiment(config)
        ckpt = Checkpoints(str(tmp_path), keep=2, best_metric="test/accuracy", best_mode="max")
        state, _ = ckpt.restore(initial_state(exp))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state.params))


def _one_step_params(weight_decay):
    model = models.get_model("simple_cnn", num_classes=3, widths=(4,), dense_units=8,
                             weight_decay=weight_decay, head_dropout=0.0)
    tx = optax.sgd(0.1)
    state = create_train_state(model, tx, seed=0, image_shape=(8, 8, 3))
    step = jax.jit(make_train_step(
        model, tx, num_classes=3,
        preprocess=lambda k, x, y: (x.astype(jnp.float32) / 255, jax.nn.one_hot(y, 3)),
        constraints={},
    ))
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3)), jnp.uint8),
             "label": jnp.array([0, 1, 2, 0]), "mask": jnp.ones(4, bool)}
    new, metrics = step(state, batch)
    return new.params, metrics


def test_regularization_penalties_enter_the_loss_and_gradient():
    p0, m0 = _one_step_params(0.0)
    p1, m1 = _one_step_params(1e-1)
    assert float(m1["loss"]) > float(m1["ce"])
    assert float(m0["loss"]) == pytest.approx(float(m0["ce"]))
    k0, k1 = p0["Conv2D_0"]["kernel"], p1["Conv2D_0"]["kernel"]
    assert not np.allclose(np.asarray(k0), np.asarray(k1))
    # Dense layers carry no regularizer in simple_cnn, so their update is unchanged.
    np.testing.assert_allclose(np.asarray(p0["Dense_1"]["bias"]), np.asarray(p1["Dense_1"]["bias"]), atol=1e-6)


class _Constrained(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x, training=False):
        x = nn.Conv2D(4, 3, kernel_constraint="non_neg")(x)
        return nn.Dense(2)(nn.GlobalAveragePooling2D()(x))


def test_constraints_hold_after_every_train_step():
    model = _Constrained()
    tx = optax.sgd(1.0)
    state = create_train_state(model, tx, seed=0, image_shape=(6, 6, 3))
    constraints = nn.collect_constraints(model, jnp.zeros((1, 6, 6, 3)))
    step = jax.jit(make_train_step(
        model, tx, num_classes=2,
        preprocess=lambda k, x, y: (x.astype(jnp.float32) / 255 - 0.5, jax.nn.one_hot(y, 2)),
        constraints=constraints,
    ))
    rng = np.random.default_rng(1)
    for _ in range(5):
        batch = {"image": jnp.asarray(rng.integers(0, 255, (8, 6, 6, 3)), jnp.uint8),
                 "label": jnp.asarray(rng.integers(0, 2, 8)), "mask": jnp.ones(8, bool)}
        state, _ = step(state, batch)
        assert float(jnp.min(state.params["Conv2D_0"]["kernel"])) >= 0.0


@pytest.mark.parametrize("mode,values,kept", [("max", [0.5, 0.7, 0.6, 0.7], 2), ("min", [0.5, 0.3, 0.4, 0.3], 2)])
def test_best_checkpoint_is_written_only_when_the_metric_improves(tmp_path, mode, values, kept):
    from cnnlab.train.checkpoint import Checkpoints

    ckpt = Checkpoints(str(tmp_path), keep=1, best_metric="test/accuracy", best_mode=mode)
    written, save = [], ckpt.best.save
    ckpt.best.save = lambda step, **kw: (written.append(step), save(step, **kw))[1]
    for step, value in enumerate(values, start=1):
        ckpt.save_best(step, {"w": jnp.full((2,), float(step))}, {"test/accuracy": value})
    assert written == [1, 2]  # worse and equal epochs write nothing
    assert ckpt.best.best_step() == kept  # ties keep the earlier checkpoint
    assert ckpt.best.all_steps() == [kept]
    state, step = ckpt.restore({"w": jnp.zeros((2,))}, which="best")
    assert step == kept and float(state["w"][0]) == kept
    ckpt.close()
    again = Checkpoints(str(tmp_path), keep=1, best_metric="test/accuracy", best_mode=mode)
    again.save_best(9, {"w": jnp.full((2,), 9.0)}, {"test/accuracy": values[1]})  # a tie, after reopening
    assert again.best.best_step() == kept
    again.close()


# --- integrity of results: run records, config changes on resume, the recorded split ----------


def test_resuming_with_a_changed_config_is_refused_unless_allowed(tmp_path):
    from cnnlab.train.rundir import ConfigChangedError

    train_and_evaluate(smoke_config(num_epochs=1), str(tmp_path))
    changed = smoke_config(**{"num_epochs": 2, "optimizer.learning_rate": 1e6})
    with pytest.raises(ConfigChangedError) as err:
        train_and_evaluate(changed, str(tmp_path))
    message = str(err.value)
    for needle in ("optimizer.learning_rate", "1000000.0", "num_epochs", "1 -> 2", "--allow_config_change"):
        assert needle in message, (needle, message)
    assert json.loads((tmp_path / "config.json").read_text())["num_epochs"] == 1  # nothing rewritten
    assert [r["epoch"] for r in _epoch_records(str(tmp_path))] == [1]

    train_and_evaluate(smoke_config(num_epochs=2), str(tmp_path), allow_config_change=True)
    assert [r["epoch"] for r in _epoch_records(str(tmp_path))] == [1, 2]
    (change,) = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    steps_per_epoch = _epoch_records(str(tmp_path))[0]["step"]
    assert change["step"] == steps_per_epoch and change["changes"] == {"num_epochs": [1, 2]}
    history = sorted((tmp_path / "config_history").iterdir())
    assert len(history) == 1 and json.loads(history[0].read_text())["num_epochs"] == 1


def test_a_run_records_its_split_and_environment_and_eval_refuses_a_changed_split(tmp_path, capsys):
    from cnnlab.data.testing import folder_config, make_tree, truncate_file
    from cnnlab.train.rundir import SplitChangedError

    root = make_tree(tmp_path / "tree", {"a": 12, "b": 12})
    config = smoke_config(num_epochs=1, batch_size=8, eval_batch_size=8, normalization="mean_std")
    config.data = {**config.data.to_dict(), **folder_config(root, tmp_path / "cache"),
                   "source": "folder", "val_fraction": 0.25}
    run = tmp_path / "run"
    train_and_evaluate(config, str(run))
    split = json.loads((run / "split.json").read_text())
    files = {name: set(part["files"]) for name, part in split["splits"].items()}
    assert sorted(files) == ["test", "train", "val"]
    assert not files["train"] & files["test"] and not files["val"] & (files["train"] | files["test"])
    assert sum(map(len, files.values())) == 24
    preprocessing = json.loads((run / "preprocessing.json").read_text())
    assert preprocessing["normalization"] == "mean_std" and len(preprocessing["mean"]) == len(preprocessing["std"]) == 3
    env = json.loads((run / "environment.json").read_text())
    assert env["jax"] == jax.__version__ and env["devices"]
    assert env["conv_formulation"] == "xla"  # tests/conftest.py pins it
    assert env["onednn"] == "not used (CNNLAB_CONV_FORMULATION=xla)"
    for path in run.iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o044 == 0o044, path  # world-readable

    first = evaluate(None, str(run), which="best")  # the data on disk still gives the recorded split
    # A training image unreadable now: val and test are unchanged, so eval warns and evaluates
    # them as before (normalized with the recorded training statistics, not recomputed ones).
    capsys.readouterr()
    train_image = sorted(files["train"])[0]
    truncate_file(root / train_image, 0.3)
    with pytest.warns(UserWarning, match=train_image):
        again = evaluate(None, str(run), which="best", overwrite=True)
    assert again.keys() == first.keys() and (again["checkpoint"], again["step"]) == (first["checkpoint"], first["step"])
    assert {k: again[k] for k in again if "/" in k} == pytest.approx({k: first[k] for k in first if "/" in k}, rel=1e-6)
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert "train split" in warning and train_image in warning and "val and test are as recorded" in warning
    victim = sorted(files["test"])[0]
    (root / victim).unlink()
    with pytest.raises(SplitChangedError, match=victim.split("/")[-1]), pytest.warns(UserWarning, match=train_image):
        evaluate(None, str(run), which="best")


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror():
    from cnnlab.train.metrics import batch_sums
    from cnnlab.train.steps import eval_logits, make_eval_step

    model = models.get_model("stridednet", num_classes=3, widths=(4, 8, 8))
    images = jax.random.uniform(jax.random.PRNGKey(1), (5, 16, 16, 3))
    variables = model.init({"params": jax.random.PRNGKey(0)}, images, training=False)
    plain = model.apply(variables, images, training=False)
    mirrored = model.apply(variables, images[:, :, ::-1], training=False)
    assert not np.allclose(plain, mirrored, atol=1e-3)  # the test can tell the two apart
    np.testing.assert_allclose(eval_logits(model, variables, images), plain, rtol=1e-6)
    averaged = eval_logits(model, variables, images, flip=True)
    np.testing.assert_allclose(averaged, 0.5 * (plain + mirrored), rtol=1e-5, atol=1e-6)

    batch = {"image": images, "label": jnp.array([0, 1, 2, 0, 1]), "mask": jnp.ones(5, bool)}
    step = make_eval_step(model, num_classes=3, normalize=lambda x: x, metrics=("loss",), flip=True)
    sums = step(variables["params"], variables.get("batch_stats", {}), batch)
    expected = batch_sums(("loss",), averaged, batch["label"], jnp.ones(5), 3)
    np.testing.assert_allclose(sums["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_array_equal(sums["confusion"], expected["confusion"])


@register_step("centralized_test")
def centralized_step(model, tx, **kwargs):
    """Gradient centralization (Yong et al. 2020: each kernel's gradient less its mean over all
    but the output axis), logging the parameters' global norm: the default step around it."""

    def centralize(g):
        return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True) if g.ndim > 1 else g

    centralized = optax.GradientTransformation(
        tx.init, lambda g, s, p=None: tx.update(jax.tree_util.tree_map(centralize, g), s, p))
    step = make_train_step(model, centralized, **kwargs)

    def train_step(state, batch):
        state, metrics = step(state, batch)
        return state, {**metrics, "param_norm": optax.tree.norm(state.params)}

    return train_step


def test_a_registered_train_step_trains_packed_and_alone_alike(tmp_path):
    base = tiny_config()
    base.train_step = "centralized_test"
    base.log_every_steps = 1
    configs = [apply_point(base, {"seed": s}) for s in (0, 1)]
    train_packed_and_alone(configs, tmp_path)
    for k in range(2):
        for run in (f"packed{k}", f"alone{k}"):
            steps = [r for r in read_metrics(str(tmp_path / run / "metrics.jsonl")) if r["kind"] == "train"]
            assert len(steps) == 6 and all(r["param_norm"] > 0 for r in steps)
    extensions = json.loads((tmp_path / "alone0" / "extensions.json").read_text())
    assert any(e["module"].split(".")[-1] == "test_train" for e in extensions)
    base.train_step = "centralised_test"
    with pytest.raises(ConfigError, match="'train_step'.*did you mean 'centralized_test'"):
        validate_config(base)
