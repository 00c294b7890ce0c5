"""cnnlab.nn layers against Keras 3: outputs, penalties (layer.losses), constraints, errors."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnlab import nn

keras = pytest.importorskip("keras")


def _set_random_weights(layer, rng):
    weights = [rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    return weights


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv2d_module_equals_keras_layer_with_same_weights(data_format):
    rng = np.random.default_rng(0)
    kwargs = dict(strides=2, padding="same", data_format=data_format, groups=2, activation="relu")
    theirs = keras.layers.Conv2D(6, 3, **kwargs)
    shape = (2, 9, 10, 4) if data_format == "channels_last" else (2, 4, 9, 10)
    theirs.build(shape)
    kernel, bias = _set_random_weights(theirs, rng)
    ours = nn.Conv2D(6, 3, **kwargs)
    x = rng.standard_normal(shape).astype(np.float32)
    variables = ours.init(jax.random.key(0), jnp.asarray(x))
    assert variables["params"]["kernel"].shape == kernel.shape
    assert variables["params"]["bias"].shape == bias.shape
    y = ours.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(theirs(x)), atol=1e-4, rtol=1e-4)


def test_conv2d_signature_matches_keras():
    import dataclasses
    import inspect

    keras_params = inspect.signature(keras.layers.Conv2D.__init__).parameters
    ours = [f.name for f in dataclasses.fields(nn.Conv2D) if f.name not in ("parent", "name")]
    keras_names = [n for n in keras_params if n not in ("self", "kwargs", "lora_rank", "lora_alpha")]
    assert ours[: len(keras_names)] == keras_names
    for name in keras_names:
        default = keras_params[name].default
        if default is inspect.Parameter.empty:
            continue
        assert nn.Conv2D.__dataclass_fields__[name].default == default, name


@pytest.mark.parametrize(
    "regularizer",
    ["l2", "l1", "L1L2", {"class_name": "L1L2", "config": {"l1": 0.003, "l2": 0.02}}],
)
def test_penalties_equal_keras_layer_losses(regularizer):
    rng = np.random.default_rng(1)
    kwargs = dict(
        kernel_regularizer=regularizer,
        bias_regularizer="l2",
        activity_regularizer="l1",
    )
    theirs = keras.layers.Conv2D(4, 3, **kwargs)
    shape = (3, 8, 8, 2)
    theirs.build(shape)
    kernel, bias = _set_random_weights(theirs, rng)
    x = rng.standard_normal(shape).astype(np.float32)
    theirs(x)
    expected = sorted(float(v) for v in theirs.losses)

    ours = nn.Conv2D(4, 3, **kwargs)
    _, aux = ours.apply(
        {"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x), mutable=[nn.LOSSES]
    )
    got = sorted(float(v) for v in jax.tree_util.tree_leaves(aux[nn.LOSSES]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(nn.regularization_loss(aux[nn.LOSSES])), sum(expected), rtol=1e-4)


def test_dense_and_batchnorm_match_keras_in_training_and_inference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 5)).astype(np.float32) * 3 + 1

    dense = keras.layers.Dense(3, activation="sigmoid", kernel_regularizer="orthogonal_regularizer")
    dense.build(x.shape)
    k, b = _set_random_weights(dense, rng)
    y, aux = nn.Dense(3, activation="sigmoid", kernel_regularizer="orthogonal_regularizer").apply(
        {"params": {"kernel": k, "bias": b}}, jnp.asarray(x), mutable=[nn.LOSSES]
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense(x)), atol=1e-5)
    np.testing.assert_allclose(float(nn.regularization_loss(aux[nn.LOSSES])), float(dense.losses[0]), rtol=1e-5)

    bn = keras.layers.BatchNormalization()
    bn.build(x.shape)
    gamma, beta = rng.standard_normal(5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    bn.set_weights([gamma, beta, np.zeros(5, np.float32), np.ones(5, np.float32)])
    ours = nn.BatchNormalization()
    variables = {
        "params": {"gamma": gamma, "beta": beta},
        "batch_stats": {"moving_mean": jnp.zeros(5), "moving_variance": jnp.ones(5)},
    }
    y_train, updates = ours.apply(variables, jnp.asarray(x), training=True, mutable=["batch_stats"])
    y_keras = np.asarray(bn(x, training=True))
    np.testing.assert_allclose(np.asarray(y_train), y_keras, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["moving_mean"]), np.asarray(bn.moving_mean), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["moving_variance"]), np.asarray(bn.moving_variance), atol=1e-6
    )
    variables["batch_stats"] = updates["batch_stats"]
    y_inf = ours.apply(variables, jnp.asarray(x), training=False)
    np.testing.assert_allclose(np.asarray(y_inf), np.asarray(bn(x, training=False)), atol=1e-5)


def test_batchnorm_defaults_are_keras():
    layer = nn.BatchNormalization()
    assert (layer.momentum, layer.epsilon, layer.axis) == (0.99, 1e-3, -1)


def test_flatten_channels_first_matches_keras():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    got = nn.Flatten(data_format="channels_first").apply({}, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(keras.layers.Flatten(data_format="channels_first")(x)))


def test_dropout_training_and_inference():
    x = jnp.ones((1000,))
    layer = nn.Dropout(0.25)
    assert np.array_equal(np.asarray(layer.apply({}, x, training=False)), np.asarray(x))
    y = layer.apply({}, x, training=True, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y) != 0
    assert 0.68 < kept.mean() < 0.82
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)


class _Tiny(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.Conv2D(4, 3, kernel_constraint="non_neg", bias_constraint="max_norm", name="conv")(x)
        x = nn.BatchNormalization(gamma_constraint="unit_norm")(x, training=training)
        x = nn.GlobalAveragePooling2D()(x)
        return nn.Dense(2, kernel_constraint={"class_name": "MaxNorm", "config": {"max_value": 0.5}})(x)


def test_constraints_are_found_and_hold_after_every_update():
    model = _Tiny()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32))
    found = nn.collect_constraints(model, x)
    assert set(found) == {
        ("conv", "kernel"),
        ("conv", "bias"),
        ("BatchNormalization_0", "gamma"),
        ("Dense_0", "kernel"),
    }
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    tx = optax.sgd(0.5)
    opt_state = tx.init(params)

    def loss(p):
        y, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, training=True,
                           mutable=["batch_stats"])
        return jnp.sum((y - 3.0) ** 2) - jnp.sum(p["conv"]["kernel"]) * 10

    for _ in range(3):
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = nn.apply_constraints(optax.apply_updates(params, updates), found)
        assert float(jnp.min(params["conv"]["kernel"])) >= 0.0
        norms = jnp.sqrt(jnp.sum(params["Dense_0"]["kernel"] ** 2, axis=0))
        assert float(jnp.max(norms)) <= 0.5 + 1e-5
        np.testing.assert_allclose(float(jnp.linalg.norm(params["BatchNormalization_0"]["gamma"])), 1.0, rtol=1e-4)


def test_constraint_projection_equals_keras():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3, 2, 4)).astype(np.float32) * 3
    found = {("l", "kernel"): nn.Conv2D(4, 3, kernel_constraint="max_norm").param_constraints()["kernel"]}
    got = nn.apply_constraints({"l": {"kernel": jnp.asarray(w)}}, found)["l"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(keras.constraints.MaxNorm()(w)), atol=1e-6)


@pytest.mark.parametrize(
    "cls,kwargs,needle",
    [
        (nn.Conv2D, dict(filters=0, kernel_size=3), "filters"),
        (nn.Conv2D, dict(filters=-2, kernel_size=3), "filters"),
        (nn.Conv2D, dict(filters=4, kernel_size=0), "kernel_size"),
        (nn.Conv2D, dict(filters=4, kernel_size=(3, 3, 3)), "kernel_size"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, padding="full"), "padding"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, data_format="NCHW"), "data_format"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, strides=2, dilation_rate=2), "dilation_rate"),
        (nn.Conv2D, dict(filters=6, kernel_size=3, groups=4), "groups"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, activation="relu7"), "relu7"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, kernel_initializer="he_normalish"), "he_normalish"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, kernel_regularizer="l3"), "l3"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, kernel_constraint="non_negative_ish"), "non_negative_ish"),
        (nn.Conv2D, dict(filters=4, kernel_size=3, padding_mode="mirror"), "padding_mode"),
        (nn.Dense, dict(units=0), "units"),
        (nn.Dropout, dict(rate=1.5), "rate"),
        (nn.MaxPooling2D, dict(pool_size=0), "pool_size"),
        (nn.DepthwiseConv2D, dict(kernel_size=3, depth_multiplier=0), "depth_multiplier"),
        (nn.Conv2DTranspose, dict(filters=4, kernel_size=3, padding="causal"), "padding"),
    ],
)
def test_bad_layer_arguments_raise_at_construction(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)


def test_input_channels_not_divisible_by_groups_raises_at_first_call():
    layer = nn.Conv2D(4, 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))


def test_mixed_precision_module():
    layer = nn.Conv2D(4, 3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert layer.apply(variables, jnp.ones((1, 8, 8, 3))).dtype == jnp.bfloat16


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 1.0])
def test_dropout_with_a_traced_rate_gives_the_same_bits_as_the_python_rate(rate):
    # Packed sweep trials pass their dropout rates as traced scalars.
    x = jax.random.normal(jax.random.key(3), (4, 64))
    rngs = {"dropout": jax.random.key(0)}
    want = nn.Dropout(rate).apply({}, x, training=True, rngs=rngs)
    got = jax.jit(lambda r: nn.Dropout(r).apply({}, x, training=True, rngs=rngs))(jnp.float32(rate))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    traced_eval = jax.jit(lambda r: nn.Dropout(r).apply({}, x, training=False))(jnp.float32(rate))
    np.testing.assert_array_equal(np.asarray(traced_eval), np.asarray(x))
    # The input gradient stays finite at every rate, 1 included (nothing kept: zero gradient).
    grad = jax.jit(lambda r: jax.grad(
        lambda y: nn.Dropout(r).apply({}, y, training=True, rngs=rngs).sum())(x))(jnp.float32(rate))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert (np.asarray(grad) == 0).all() == (rate == 1.0)


X4 = (2, 16, 16, 3)
# (layer name, args, kwargs, input shape, needle): Keras 3 itself (an eager call on a real
# array) is the reference. needle=None: both accept, with equal outputs for equal weights;
# otherwise both raise, cnnlab with a ValueError whose message contains the needle.
KERAS_CASES = [
    ("MaxPooling2D", (2,), dict(strides=(2, 1)), X4, None),
    ("AveragePooling2D", (2,), dict(strides=(2, 1)), X4, None),
    ("AveragePooling2D", (3,), dict(strides=(1, 2), padding="same"), X4, None),
    ("MaxPooling2D", ((3, 2),), dict(strides=2, padding="same"), X4, None),
    ("MaxPooling2D", (2,), dict(padding="SAME"), X4, None),
    ("MaxPooling2D", (2,), dict(data_format="Channels_First"), (2, 3, 16, 16), None),
    ("MaxPooling2D", ((2, 2, 2),), {}, X4, "pool_size"),
    ("MaxPooling2D", (2,), dict(strides=(2, 2, 2)), X4, "strides"),
    ("MaxPooling2D", (0,), {}, X4, "pool_size"),
    ("MaxPooling2D", (3.0,), {}, X4, "pool_size"),
    ("MaxPooling2D", (2,), dict(strides=0), X4, "strides"),
    ("MaxPooling2D", (2,), dict(strides=-1), X4, "strides"),
    ("MaxPooling2D", (2,), dict(padding="full"), X4, "padding"),
    ("MaxPooling2D", (2,), dict(data_format="NCHW"), X4, "data_format"),
    ("MaxPooling2D", (2,), {}, (16, 16, 3), "dimensions"),
    ("AveragePooling2D", (2,), {}, (1, 2, 16, 16, 3), "dimensions"),
    ("GlobalAveragePooling2D", (), dict(keepdims=True), X4, None),
    ("GlobalAveragePooling2D", (), {}, (16, 16, 3), "dimensions"),
    ("GlobalMaxPooling2D", (), dict(data_format="bad"), X4, "data_format"),
    ("Conv2D", (8, 32), {}, X4, r"Conv2D: Computed output size .*\(2, 16, 16, 3\).*\(-15, -15\)"),
    ("Conv2D", (8, 3), dict(dilation_rate=8), X4, "zero or negative"),
    ("Conv2D", (8, 3), dict(dilation_rate=7), X4, None),
    ("Conv2D", (8, 16), {}, X4, None),
    ("Conv2D", (8, 17), dict(padding="same"), X4, None),
    ("Conv2D", (8, 3), dict(padding="SAME", data_format="CHANNELS_LAST"), X4, None),
    ("Conv2D", (np.int64(8), (np.int64(3), 3)), {}, X4, None),
    ("Conv2D", (8, 3), dict(strides=2, dilation_rate=2), X4, "dilation_rate"),
    ("Conv2D", (8, 3), dict(strides=(2, 1), dilation_rate=(1, 2)), X4, "dilation_rate"),
    ("Conv2D", (8, 3), dict(strides=0), X4, "strides"),
    ("Conv2D", (8, (3, 0)), {}, X4, "kernel_size"),
    ("Conv2D", (8, 3.0), {}, X4, "kernel_size"),
    ("Conv2D", (8, 3), dict(dilation_rate=0), X4, "dilation_rate"),
    ("Conv2D", (0, 3), {}, X4, "filters"),
    ("Conv2D", (8, 3), dict(groups=0), X4, "groups"),
    ("Conv2D", (8, 3), dict(groups=3), X4, "groups"),
    ("Conv2D", (8, 3), dict(groups=2), X4, "groups"),
    ("Conv2D", (8, 3), dict(padding="causal"), X4, "causal"),
    ("Conv2D", (8, 3), {}, (16, 16, 3), "dimensions"),
    ("Conv2D", (8, 3), {}, (1, 2, 16, 16, 3), "dimensions"),
    ("Conv1D", (8, 32), dict(padding="causal"), (2, 16, 3), None),
    ("Conv1D", (8, 17), {}, (2, 16, 3), "zero or negative"),
    ("DepthwiseConv2D", (3,), dict(strides=2, dilation_rate=2), X4, None),
    ("DepthwiseConv2D", (3,), dict(strides=2, dilation_rate=2, padding="same"), X4, None),
    ("DepthwiseConv2D", (32,), {}, X4, r"DepthwiseConv2D: Computed output size"),
    ("DepthwiseConv2D", (3,), dict(depth_multiplier=0), X4, "depth_multiplier"),
    ("DepthwiseConv2D", (3,), dict(padding="causal"), X4, "causal"),
    ("SeparableConv2D", (4, 3), dict(strides=2, dilation_rate=2), X4, None),
    ("SeparableConv2D", (4, 32), {}, X4, "SeparableConv2D: Computed output size"),
    ("SeparableConv2D", (0, 3), {}, X4, "filters"),
    ("Conv2DTranspose", (4, 40), {}, X4, None),
    ("Conv2DTranspose", (4, 3), dict(strides=2, output_padding=1), X4, None),
    ("Conv2DTranspose", (4, 3), dict(strides=2, output_padding=1, padding="same"), X4, None),
    ("Conv2DTranspose", (4, 3), dict(padding="SAME"), X4, None),
    ("Conv2DTranspose", (4, 3), dict(strides=2, dilation_rate=2), X4, "dilation_rate"),
    ("Conv2DTranspose", (4, 3), dict(strides=2, output_padding=2), X4, "output_padding"),
    ("Conv2DTranspose", (4, 3), dict(strides=2, output_padding=-1), X4, "output_padding"),
    ("Conv2DTranspose", (4, 3), dict(padding="causal"), X4, "padding"),
    ("Conv2DTranspose", (4, 3), dict(strides=0), X4, "strides"),
    ("Conv2DTranspose", (0, 3), {}, X4, "filters"),
    ("Dense", (5,), {}, X4, None),
    ("Dense", (0,), {}, X4, "units"),
    ("Dense", (3.0,), {}, X4, "units"),
    ("Dense", (5,), {}, (3,), "dimensions"),
    ("Dropout", (1.0,), {}, X4, None),
    ("Dropout", (0,), {}, X4, None),
    ("Dropout", (0.5,), dict(noise_shape=(None, 1, 1, 3)), X4, None),
    ("Dropout", (0.5,), dict(noise_shape=(None, 0, 1, 3)), X4, "noise_shape"),
    ("Dropout", (0.5,), dict(noise_shape="abc"), X4, "noise_shape"),
    ("Dropout", (1.5,), {}, X4, "rate"),
    ("Dropout", (-0.1,), {}, X4, "rate"),
    ("Dropout", ("0.5",), {}, X4, "rate"),
    ("Flatten", (), {}, (3,), None),
    ("Flatten", (), dict(data_format="bad"), X4, "data_format"),
    ("Flatten", (), {}, (), "dimensions"),
    ("BatchNormalization", (), dict(epsilon=0.0), X4, None),
    ("BatchNormalization", (), dict(momentum=1.5), X4, None),
    ("BatchNormalization", (), dict(axis=1), X4, None),
    ("BatchNormalization", (), dict(axis=0), X4, None),
    ("BatchNormalization", (), dict(axis=4), X4, "axis"),
    ("BatchNormalization", (), dict(axis=-5), X4, "axis"),
    ("BatchNormalization", (), dict(axis=[1, 2]), X4, "axis"),
    ("Activation", ("relu7",), {}, X4, "relu7"),
]


def _keras_output(name, args, kwargs, x, rng):
    layer = getattr(keras.layers, name)(*args, **kwargs)
    layer(x)
    # Positive weights keep BatchNormalization's variance valid whatever epsilon is.
    layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return layer.get_weights(), np.asarray(layer(x))


@pytest.mark.parametrize(
    "name,args,kwargs,shape,needle", KERAS_CASES,
    ids=[f"{c[0]}-{i}-{'rejects' if c[4] else 'accepts'}" for i, c in enumerate(KERAS_CASES)],
)
def test_layers_accept_and_reject_what_keras_does(name, args, kwargs, shape, needle):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    if needle is not None:
        with pytest.raises((ValueError, TypeError, IndexError)):  # what Keras raises varies
            _keras_output(name, args, kwargs, x, rng)
        with pytest.raises(ValueError, match=needle):
            getattr(nn, name)(*args, **kwargs).init(jax.random.key(0), jnp.asarray(x))
        return
    weights, expected = _keras_output(name, args, kwargs, x, rng)
    layer = getattr(nn, name)(*args, **kwargs)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    names = [(c, n) for c in ("params", "batch_stats") for n in variables.get(c, {})]
    assert [variables[c][n].shape for c, n in names] == [w.shape for w in weights]
    variables = {c: {n: w for (c2, n), w in zip(names, weights) if c2 == c} for c in variables}
    got = layer.apply(variables, jnp.asarray(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_pooling_larger_than_the_input_raises_as_keras_shape_inference_does():
    # Keras' eager call returns an empty (2, 0, 0, 3) array, but its shape inference (any
    # Sequential or functional model) raises; cnnlab always raises, naming the layer.
    with pytest.raises(ValueError, match="zero or negative"):
        keras.layers.MaxPooling2D(32)(keras.Input((16, 16, 3)))
    for cls in (nn.MaxPooling2D, nn.AveragePooling2D):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: Computed output size .*\(2, 16, 16, 3\)"):
            cls(32).init(jax.random.key(0), jnp.ones(X4))


def test_dropout_noise_shape_of_the_wrong_rank_raises_in_training_as_keras():
    x = np.ones(X4, np.float32)
    with pytest.raises((ValueError, TypeError)):  # Keras: a broadcasting error
        keras.layers.Dropout(0.5, noise_shape=(None, 1))(x, training=True)
    with pytest.raises(ValueError, match="noise_shape"):
        nn.Dropout(0.5, noise_shape=(None, 1)).apply(
            {}, jnp.asarray(x), training=True, rngs={"dropout": jax.random.key(0)}
        )
