"""cnnlab.train.losses: losses by name with their own config fields (traceable ones pack), the
focal loss, a user's loss from their own module, runs recorded before the loss registry
resuming unchanged, the metrics a loss reports (logged per step and per epoch, packed as alone),
and knowledge distillation from a teacher run (cnnlab.train.distill: a loss with extra inputs)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_same_epoch_records, epoch_records, tiny_config, train_packed_and_alone

from cnnlab.schema import ConfigError, Field, in_range
from cnnlab.sweep import apply_point
from cnnlab.train import (
    distill,
    losses,
    pack_key,
    train_and_evaluate,
    train_trials,
    validate_config,
)
from cnnlab.train.experiment import load_trained, make_normalize
from cnnlab.train.packing import varying
from cnnlab.train.steps import create_train_state, make_train_step, zero_sums
from cnnlab.train.writers import read_metrics


@losses.register("poly1_test", epsilon=Field(1.0, float, in_range(-1, 10), "first polynomial term",
                                             traceable=True))
def poly1(logits, targets, *, epsilon):
    ce = optax.softmax_cross_entropy(logits, targets)
    return ce + epsilon * (1.0 - jnp.sum(targets * jax.nn.softmax(logits), -1))


@losses.register("poly1_metrics_test", metrics=("ce", "gap"),
                 epsilon=Field(1.0, float, in_range(-1, 10), "first polynomial term", traceable=True))
def poly1_with_metrics(logits, targets, *, epsilon):
    ce = optax.softmax_cross_entropy(logits, targets)
    gap = 1.0 - jnp.sum(targets * jax.nn.softmax(logits), -1)
    return ce + epsilon * gap, {"ce": ce, "gap": gap}


def _targets(seed=0, batch=6, k=5):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((batch, k)) * 3, jnp.float32)
    targets = jax.nn.softmax(jnp.asarray(rng.standard_normal((batch, k)), jnp.float32) * 4)
    return logits, targets


def test_focal_is_the_formula_and_gamma_zero_is_the_cross_entropy():
    logits, targets = _targets()
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    t = np.asarray(targets, np.float64)
    want = -(t * (1 - p) ** 2 * np.log(p)).sum(-1)
    np.testing.assert_allclose(losses.focal(logits, targets, gamma=2.0), want, rtol=1e-5)
    np.testing.assert_allclose(losses.focal(logits, targets, gamma=0.0),
                               optax.softmax_cross_entropy(logits, targets), rtol=1e-6)
    # finite gradients where a probability rounds to 1
    sure = jnp.asarray([[100.0, 0.0, 0.0]])
    g = jax.grad(lambda x: losses.focal(x, jnp.asarray([[1.0, 0.0, 0.0]]), gamma=0.5).sum())(sure)
    assert np.isfinite(np.asarray(g)).all()


def test_the_loss_section_holds_the_chosen_losss_fields_checked():
    c = tiny_config()
    assert validate_config(c).loss.to_dict() == {"name": "softmax_cross_entropy", "label_smoothing": 0.0}
    c.loss.name = "focal"
    c.loss.focal.gamma = 3.0
    assert validate_config(c).loss.focal.gamma == 3.0
    c.loss.focal.gamma = -1.0
    with pytest.raises(ConfigError, match=r"'loss.focal.gamma': invalid value -1.0 \(must be >= 0\)"):
        validate_config(c)
    c.loss.focal.gamma = 2.0
    c.loss.name = "focla"
    with pytest.raises(ConfigError, match="did you mean 'focal'"):
        validate_config(c)
    c.loss.name = "softmax_cross_entropy"
    c.loss.focal.gamma = 5.0
    with pytest.warns(UserWarning, match="loss.focal.gamma set, but loss.name is 'softmax_cross_entropy'"):
        resolved = validate_config(c)
    assert "focal" not in resolved.loss


def test_a_users_loss_trains_and_its_traceable_field_packs(tmp_path):
    base = tiny_config()
    base.loss.name = "poly1_test"
    configs = [apply_point(base, {"loss.poly1_test.epsilon": e}) for e in (0.5, 2.0)]
    assert len({pack_key(c) for c in configs}) == 1
    assert set(varying([validate_config(c) for c in configs])) == {"loss.poly1_test.epsilon"}
    outcomes, _ = train_trials(configs, [str(tmp_path / f"packed{k}") for k in range(2)])
    assert all(o.error is None for o in outcomes)
    for k, c in enumerate(configs):
        train_and_evaluate(c, str(tmp_path / f"alone{k}"))
        assert_same_epoch_records(str(tmp_path / f"packed{k}"), str(tmp_path / f"alone{k}"), k)
    with open(tmp_path / "alone0" / "extensions.json") as f:
        assert any(e["module"] == __name__.split(".")[-1] or e["module"] == __name__ for e in json.load(f))
    # the loss is what trains: a larger epsilon gives a larger training loss at the same start
    first = [epoch_records(str(tmp_path / f"alone{k}"))[0]["train/loss"] for k in range(2)]
    assert first[1] > first[0]


@pytest.mark.slow
def test_the_focal_loss_trains(tmp_path):
    c = tiny_config()
    c.loss.name = "focal"
    c.num_epochs = 1
    final = train_and_evaluate(c, str(tmp_path / "run"))
    assert np.isfinite(final["train/loss"])


def test_a_run_recorded_before_the_loss_registry_resumes_unchanged(tmp_path):
    # Its config.json has loss: {label_smoothing} only; the new fields at their defaults are no change.
    c = tiny_config()
    workdir = str(tmp_path / "run")
    c.num_epochs = 1
    train_and_evaluate(c, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        recorded = json.load(f)
    recorded["loss"] = {"label_smoothing": 0.0}
    with open(path, "w") as f:
        json.dump(recorded, f)
    c.num_epochs = 2
    with pytest.raises(Exception, match="1 key.*num_epochs: 1 -> 2"):  # a real change is still refused
        train_and_evaluate(c, workdir)
    c.num_epochs = 1
    train_and_evaluate(c, workdir)  # no change: evaluates the finished run


# ---------------------------------------------------------------------------------------------
# Metrics a loss reports
# ---------------------------------------------------------------------------------------------


def _step_records(workdir):
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "train"]


@pytest.mark.slow
def test_a_losss_metrics_are_logged_per_step_and_per_epoch_alone_and_packed(tmp_path):
    base = tiny_config()
    base.loss.name = "poly1_metrics_test"
    base.log_every_steps = 1
    configs = [apply_point(base, {"loss.poly1_metrics_test.epsilon": e}) for e in (0.5, 2.0)]
    for k, (c, records) in enumerate(zip(configs, train_packed_and_alone(configs, tmp_path))):
        epsilon = c.loss.poly1_metrics_test.epsilon
        for r in records:  # epoch means of the per-example values; the loss is their sum here
            assert r["train/loss"] == pytest.approx(r["train/ce"] + epsilon * r["train/gap"], rel=1e-5)
        for run in (f"packed{k}", f"alone{k}"):
            steps = _step_records(str(tmp_path / run))
            assert len(steps) == 6 and all({"train/ce", "train/gap"} <= r.keys() for r in steps)
            for r in steps:  # the last batch's means
                assert r["ce"] == pytest.approx(r["train/ce"] + epsilon * r["train/gap"], rel=1e-5)


def test_the_state_sums_a_losss_metrics_and_a_loss_without_keeps_the_old_state():
    # A loss without metrics: the epoch sums of runs recorded before losses reported any.
    assert set(zero_sums()) == {"loss", "correct", "count"}
    assert set(zero_sums(("ce", "gap"))["loss_metrics"]) == {"ce", "gap"}
    from cnnlab import models

    model = models.get_model("simple_cnn", num_classes=3, widths=(4,), dense_units=8)
    tx = optax.sgd(0.1)
    preprocess = lambda k, x, y: (x.astype(jnp.float32) / 255, jax.nn.one_hot(y, 3))  # noqa: E731
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3)), jnp.uint8),
             "label": jnp.array([0, 1, 2, 0]), "mask": jnp.ones(4, bool)}
    loss_fn = lambda x, t: poly1_with_metrics(x, t, epsilon=1.0)  # noqa: E731
    state = create_train_state(model, tx, seed=0, image_shape=(8, 8, 3), loss_metrics=("ce", "gap"))
    step = make_train_step(model, tx, num_classes=3, preprocess=preprocess, constraints={}, loss_fn=loss_fn)
    new, metrics = jax.jit(step)(state, batch)
    assert set(metrics["loss_metrics"]) == {"ce", "gap"}
    np.testing.assert_allclose(new.epoch_sums["loss_metrics"]["ce"], 4 * metrics["loss_metrics"]["ce"], rtol=1e-6)
    plain = create_train_state(model, tx, seed=0, image_shape=(8, 8, 3))
    with pytest.raises(ValueError, match=r"reports metrics \['ce', 'gap'\].*metrics="):
        jax.jit(step)(plain, batch)  # undeclared metrics have no sums to go to
    with pytest.raises(ValueError, match="must be distinct identifiers other than loss, accuracy"):
        losses.register("bad_test", metrics=("accuracy",))


# ---------------------------------------------------------------------------------------------
# Distillation from a teacher run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny softmax cross-entropy run (two epochs of tiny_config): the teacher."""
    workdir = str(tmp_path_factory.mktemp("distill") / "teacher")
    train_and_evaluate(tiny_config(), workdir)
    return workdir


def _student(teacher_dir, **fields):
    c = tiny_config()
    c.loss.name = "distill"
    c.loss.distill.teacher = teacher_dir
    for key, value in fields.items():
        c.loss.distill[key] = value
    return c


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """A distilled run (temperature 2, weight 0.5) of tiny_config from ``teacher``."""
    workdir = str(tmp_path_factory.mktemp("distill") / "student")
    train_and_evaluate(_student(teacher, temperature=2.0), workdir)
    return workdir


def test_distill_is_the_formula():
    logits, targets = _targets()
    teacher_logits = _targets(seed=1)[0]
    T, w = 3.0, 0.7
    loss, reported = distill.distill(logits, targets, teacher_logits=teacher_logits, temperature=T, weight=w,
                                     teacher="t", which="best")
    s, t = np.asarray(logits, np.float64) / T, np.asarray(teacher_logits, np.float64) / T
    log_ps = s - np.log(np.exp(s).sum(-1, keepdims=True))
    log_pt = t - np.log(np.exp(t).sum(-1, keepdims=True))
    kd = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    ce = np.asarray(optax.softmax_cross_entropy(logits, targets), np.float64)
    np.testing.assert_allclose(reported["kd"], kd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(reported["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(loss, (1 - w) * ce + w * T**2 * kd, rtol=1e-5)


@pytest.mark.slow
def test_distill_with_weight_zero_trains_as_the_cross_entropy(teacher, tmp_path):
    # The teacher is tiny_config trained with the cross-entropy: the same run, but for the loss.
    train_and_evaluate(_student(teacher, weight=0.0), str(tmp_path / "run"))
    for d, c in zip(epoch_records(str(tmp_path / "run")), epoch_records(teacher), strict=True):
        assert {"train/ce", "train/kd"} <= d.keys()
        assert d["train/loss"] == pytest.approx(d["train/ce"], rel=1e-6)
        for key in c:
            assert d[key] == (pytest.approx(c[key], rel=1e-5) if isinstance(c[key], float) else c[key]), key


def test_distill_logs_its_terms_and_resumes_exactly(teacher, student, tmp_path, capsys):
    records = epoch_records(student)
    for r in records:  # weight 0.5, temperature 2
        assert r["train/loss"] == pytest.approx(0.5 * r["train/ce"] + 0.5 * 4.0 * r["train/kd"], rel=1e-5)
        assert r["train/kd"] > 0
    assert all({"train/ce", "train/kd"} <= r.keys() for r in _step_records(student))
    with open(os.path.join(student, "config.json")) as f:
        assert json.load(f)["loss"]["distill"]["teacher"] == os.path.abspath(teacher)
    # Resume mid-epoch 2: the sums of the loss's metrics come back from the checkpoint.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(student, resumed)
    latest = os.path.join(resumed, "checkpoints", "latest")
    steps = sorted(int(p) for p in os.listdir(latest) if p.isdigit())
    assert steps[-1] == 6 and 3 < steps[-2] < 6
    shutil.rmtree(os.path.join(latest, str(steps[-1])))
    capsys.readouterr()
    train_and_evaluate(_student(teacher, temperature=2.0), resumed)
    assert f"Resuming from step {steps[-2]}" in capsys.readouterr().out
    assert epoch_records(resumed)[-1] == records[-1]  # every metric, exactly


@pytest.mark.slow
def test_two_distill_trials_differing_in_temperature_pack_and_equal_alone(teacher, student, tmp_path):
    configs = [_student(teacher, temperature=t) for t in (2.0, 8.0)]
    assert len({pack_key(c) for c in configs}) == 1
    assert set(varying([validate_config(c) for c in configs])) == {"loss.distill.temperature"}
    outcomes, _ = train_trials(configs, [str(tmp_path / f"packed{k}") for k in range(2)])
    assert all(o.error is None for o in outcomes)
    assert_same_epoch_records(str(tmp_path / "packed0"), student, 0)
    train_and_evaluate(configs[1], str(tmp_path / "alone1"))
    assert_same_epoch_records(str(tmp_path / "packed1"), str(tmp_path / "alone1"), 1)


def test_distill_refuses_a_bad_teacher_before_writing_anything(teacher, tmp_path):
    c = tiny_config()
    c.loss.name = "distill"
    with pytest.raises(ConfigError, match=r"'loss.distill.teacher': required when loss.name is 'distill'"):
        validate_config(c)
    workdir = tmp_path / "run"
    for bad, why in [(str(tmp_path / "nowhere"), "No config.json"), (str(tmp_path), "No config.json")]:
        with pytest.raises(ConfigError, match=rf"config key 'loss.distill.teacher': .*{why}"):
            train_and_evaluate(_student(bad), str(workdir))
        assert not workdir.exists()
    other = _student(teacher)
    other.data.synthetic_num_classes = 3
    with pytest.raises(ConfigError, match=r"'loss.distill.teacher'.*the teacher predicts 4 classes, the student 3"):
        train_and_evaluate(other, str(workdir))
    other = _student(teacher)
    other.data.image_size = 24
    with pytest.raises(ConfigError, match=r"'loss.distill.teacher'.*trained on \(16, 16\) images"):
        train_and_evaluate(other, str(workdir))
    assert not workdir.exists()


def test_the_teacher_sees_the_students_images_normalized_its_own_way(teacher):
    # The teacher normalized by x / 255; a student normalizing by mean and std hands the step's
    # inputs its own normalization, which the teacher's setup converts.
    config = validate_config(_student(teacher))
    trained = load_trained(teacher)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3)), jnp.uint8)
    want = trained.model.apply(trained.variables, make_normalize(trained.normalization)(images), training=False)
    for record in ({"normalization": "scale"},
                   {"normalization": "mean_std", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}):
        inputs = losses.setup_inputs(config, num_classes=4, image_shape=(16, 16, 3), normalization=record)
        got = inputs.apply(inputs.variables, make_normalize(record)(images))["teacher_logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
