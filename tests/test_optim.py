"""Optimizers and schedules: registries, traced hyperparameters, grad accumulation, user entries."""

import importlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnlab.schema import ConfigError
from cnnlab.train import optim
from cnnlab.train.config import default_config, validate_config

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full((4,), 0.5)}
SPE = 4  # batches per epoch


def _config(name="adam", schedule="constant", **optimizer):
    c = default_config()
    c.num_epochs = 2
    c.optimizer.name = name
    c.schedule.name = schedule
    c.schedule.warmup_epochs = 0.5
    c.schedule.keras_decay.decay = 0.3
    c.schedule.cosine.min_lr_ratio = 0.1
    c.schedule.step.epochs = 1
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = 1e-2  # nonzero: the decay stage exists (and is traceable)
    c.optimizer.grad_clip_norm = 0.5  # below the gradients' norm, so clipping acts
    for part in ("adam", "adamw", "rmsprop"):
        c.optimizer[part].eps = 1e-2  # large enough that adam's updates depend on the clipping
    c.optimizer.rmsprop.momentum = 0.9  # nonzero, so that the traced value is seen to be used
    for k, v in optimizer.items():
        if k in c.optimizer:
            c.optimizer[k] = v
        else:
            c.optimizer[name][k] = v
    return c


def _grads(i):
    # Independent of the current parameters, so rounding does not feed back through the model.
    return jax.tree_util.tree_map(lambda p: jnp.sin(3.0 * p * (i + 1)) + 0.1 * i, PARAMS)


def _run(tx, steps=6):
    """Every update and the final state of ``steps`` updates from PARAMS."""
    state, params, updates = tx.init(PARAMS), PARAMS, []
    for i in range(steps):
        u, state = tx.update(_grads(i), state, params)
        params = optax.apply_updates(params, u)
        updates.append(u)
    return updates, state


def _close(a, b, tol):
    """Whether trees ``a`` and ``b`` differ by at most ``tol`` times ``b``'s largest entry."""
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(b))
    return all(float(jnp.max(jnp.abs(x - y))) <= tol * scale
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _changed(value):
    return value * 0.5


@pytest.mark.parametrize("schedule", sorted(optim.SCHEDULES))
@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_traced_hyperparameters_give_the_python_values_updates(name, schedule):
    config = _config(name, schedule)
    fields = optim.traceable_optimizer_fields(config)
    assert fields[0] == "optimizer.learning_rate"
    want, want_state = jax.jit(lambda: _run(optim.make_optimizer(config, SPE)))()
    traced = jax.jit(lambda h: _run(optim.make_optimizer(config, SPE, h)))
    h = {f: jnp.float32(optim.config_value(config, f)) for f in fields}
    got, got_state = traced(h)
    assert jax.tree_util.tree_structure(got_state) == jax.tree_util.tree_structure(want_state)
    assert jax.tree_util.tree_map(jnp.shape, got_state) == jax.tree_util.tree_map(jnp.shape, want_state)
    # 1e-6 of the updates' scale; adam's b2 enters through 1 - b2**t, which cancels (a float32
    # ulp of b2**t is ~1e-4 of 1 - b2), so XLA's rounding of it differs by up to ~1e-5.
    assert _close(got, want, 1e-5 if name.startswith("adam") else 1e-6), (name, schedule)
    for f in fields:  # each traced value is really used
        other, _ = traced({**h, f: jnp.float32(_changed(optim.config_value(config, f)))})
        assert not _close(other, want, 1e-3), f"{name}: traced {f} is ignored"


def test_which_fields_trace_follows_the_stages_of_the_config():
    assert optim.traceable_optimizer_fields(_config("adam", weight_decay=0.0, grad_clip_norm=0.0)) == (
        "optimizer.learning_rate", "optimizer.adam.b1", "optimizer.adam.b2", "optimizer.adam.eps")
    assert "optimizer.weight_decay" in optim.traceable_optimizer_fields(_config("adamw", weight_decay=0.0))
    assert optim.traceable_optimizer_fields(_config("sgd")) == (
        "optimizer.learning_rate", "optimizer.weight_decay", "optimizer.grad_clip_norm")
    # A stage that the config's Python value leaves out cannot be traced in.
    with pytest.raises(ValueError, match=r"\['optimizer.weight_decay'\] cannot be traced for optimizer 'adam'"):
        optim.make_optimizer(_config("adam", weight_decay=0.0), SPE, {"optimizer.weight_decay": 1e-3})
    with pytest.raises(ValueError, match="momentum"):
        optim.make_optimizer(_config("sgd"), SPE, {"optimizer.sgd.momentum": 0.5})


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamm'.*adam, adamw, rmsprop, sgd"):
        optim.make_optimizer(_config("adamm"), SPE)
    with pytest.raises(ValueError, match=r"Unknown schedule 'cosin'.*cosine"):
        optim.make_optimizer(_config(schedule="cosin"), SPE)


@pytest.mark.parametrize("name,expected", [
    # 8 updates, 2 of them linear warmup from 0; then the schedule over the remaining 6.
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("keras_decay", [0.0, 0.5] + [1.0 / (1.0 + 0.3 * c) for c in range(6)]),
    ("cosine", [0.0, 0.5] + [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * c / 6)) for c in range(6)]),
    ("step", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]),
])
def test_schedules_scale_the_learning_rate_after_linear_warmup(name, expected):
    config = _config(schedule=name)
    config.num_epochs, config.schedule.step.epochs, config.schedule.step.factor = 2, 1, 0.5
    schedule = optim.make_schedule(config, 4, learning_rate=0.1)
    np.testing.assert_allclose([float(schedule(c)) for c in range(8)], 0.1 * np.asarray(expected),
                               rtol=1e-6, atol=1e-9)


def test_grad_accumulation_is_one_update_of_the_mean_gradient_per_k_batches():
    config = _config("sgd", "cosine", weight_decay=0.0, grad_clip_norm=0.0)
    config.grad_accum_steps = 2
    tx = optim.make_optimizer(config, 2 * SPE)  # 2 * SPE batches: SPE updates per epoch
    config.grad_accum_steps = 1
    inner = optim.make_optimizer(config, SPE)
    state, inner_state, params = tx.init(PARAMS), inner.init(PARAMS), PARAMS
    for i in range(2 * SPE):
        u, state = tx.update(_grads(i), state, params)
        if i % 2 == 0:
            assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(u))
        else:
            mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, _grads(i - 1), _grads(i))
            want, inner_state = inner.update(mean, inner_state, params)
            assert _close(u, want, 1e-6)
        params = optax.apply_updates(params, u)


def test_a_user_registers_an_optimizer_and_a_schedule_from_their_own_module(tmp_path, monkeypatch):
    (tmp_path / "my_optimizers.py").write_text(textwrap.dedent("""
        import optax
        from cnnlab.schema import Field, at_least, in_range
        from cnnlab.train.optim import register_optimizer, register_schedule

        @register_optimizer("user_lion", b1=Field(0.9, float, in_range(0, 1), "lion b1", traceable=True),
                            b2=Field(0.99, float, in_range(0, 1), "lion b2", traceable=True))
        def lion(learning_rate, *, b1, b2):
            return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=0.0)

        @register_schedule("user_halving", every=Field(1, int, at_least(1), "epochs per halving"))
        def halving(*, steps, steps_per_epoch, every):
            return lambda count: 0.5 ** (count // (every * steps_per_epoch))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("my_optimizers")
    config = _config("user_lion", "user_halving", b1=0.8, b2=0.95, weight_decay=0.0, grad_clip_norm=0.0)
    config.schedule.warmup_epochs = 0.0
    assert validate_config(config).optimizer.to_dict() == {
        "name": "user_lion", "learning_rate": 0.1, "weight_decay": 0.0, "grad_clip_norm": 0.0,
        "weight_decay_mask": "default", "lr_multipliers": (), "user_lion": {"b1": 0.8, "b2": 0.95}}
    config.optimizer.user_lion.b1 = 1.5
    with pytest.raises(ConfigError, match=r"'optimizer.user_lion.b1': invalid value 1.5"):
        validate_config(config)
    config.optimizer.user_lion.b1 = 0.8
    assert optim.traceable_optimizer_fields(config) == (
        "optimizer.learning_rate", "optimizer.user_lion.b1", "optimizer.user_lion.b2")
    got, _ = _run(optim.make_optimizer(config, SPE))
    want, _ = _run(optax.lion(lambda c: 0.1 * 0.5 ** (c // SPE), b1=0.8, b2=0.95, weight_decay=0.0))
    assert _close(got, want, 1e-6)
    traced, _ = jax.jit(lambda h: _run(optim.make_optimizer(config, SPE, h)))(
        {"optimizer.learning_rate": jnp.float32(0.1), "optimizer.user_lion.b1": jnp.float32(0.8)})
    assert _close(traced, want, 1e-6)
    config.schedule.user_halving.every = 2
    slower, _ = _run(optim.make_optimizer(config, SPE))
    assert not _close(slower, want, 1e-3)


def test_an_optimizer_field_set_for_another_optimizer_warns_and_an_old_flat_key_names_its_new_place():
    config = default_config()
    config.optimizer.name = "sgd"
    config.optimizer.adam.b1 = 0.5
    with pytest.warns(UserWarning, match="optimizer.adam.b1 set, but optimizer.name is 'sgd'"):
        assert "adam" not in validate_config(config).optimizer
    config = default_config()
    config.optimizer.b1 = 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.b1' \(did you mean 'optimizer.adam.b1'\?\)"):
        validate_config(config)
    with pytest.raises(ValueError, match="'learning_rate' is a field of the optimizer section"):
        optim.register_optimizer("learning_rate")
