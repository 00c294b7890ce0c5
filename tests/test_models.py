"""Models: the registry (built-in and user models), traced hyperparameter fields, and
StridedNet's parameter count against Keras."""

import importlib
import os
import textwrap

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_only

from cnnlab import models, nn

BUILT_IN = ("inception", "resnet", "simple_cnn", "stridednet")
#: Small versions of the built-in models, so that compiling each takes a moment.
SMALL = {
    "stridednet": dict(widths=(8,), stem_filters=4, dense_units=16),
    "simple_cnn": dict(widths=(4, 8), dense_units=16),
    "resnet": dict(stem_filters=8, stage_filters=(8, 16), stage_depths=(1, 1)),
    "inception": dict(stem_filters=8, stage_widths=(8, 16)),
}
#: A value for each traceable field of the built-in models (nonzero, so every term shows).
VALUES = {"weight_decay": 1e-3, "dropout": 0.3, "head_dropout": 0.4, "drop_path_rate": 0.5}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_the_registry_reads_as_a_mapping():
    assert set(BUILT_IN) <= set(sorted(models.MODELS))  # (user models may be registered too)
    assert "stridednet" in models.MODELS and "vgg" not in models.MODELS
    assert models.MODELS["stridednet"] is models.StridedNet
    assert len(models.MODELS) == len(list(models.MODELS))
    assert models.traceable_fields("stridednet") == ("weight_decay", "dropout", "head_dropout")
    assert "widths" in models.model_fields("stridednet")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="stridednet"):
        models.get_model("vgg", num_classes=3)
    with pytest.raises(KeyError):  # mapping code sees a KeyError
        models.MODELS["vgg"]
    with pytest.raises(ValueError, match=r"Unknown model 'vgg'.*simple_cnn"):
        models.traceable_fields("vgg")
    with pytest.raises(ValueError, match="widths"):
        models.get_model("stridednet", num_classes=3, widthz=(3,))


def test_a_traceable_field_must_be_a_field_of_the_model():
    with pytest.raises(ValueError, match=r"'bad'.*traceable field\(s\) \['rate'\]"):
        models.register("bad", traceable=("rate",))(models.SimpleCNN)
    assert "bad" not in models.MODELS


def test_a_user_registers_a_model_from_their_own_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import flax.linen as flax_nn
        from cnnlab import models, nn

        @models.register("user_tiny_net", traceable=("weight_decay", "rate"))
        class TinyNet(flax_nn.Module):
            num_classes: int
            weight_decay: float = 0.0
            rate: float = 0.1

            @flax_nn.compact
            def __call__(self, x, training: bool = False):
                x = nn.Conv2D(4, 3, kernel_regularizer=nn.l2_or_none(self.weight_decay))(x)
                x = nn.Dropout(self.rate)(nn.GlobalAveragePooling2D()(x), training=training)
                return nn.Dense(self.num_classes)(x)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("my_models")  # what the user's config file does
    assert "user_tiny_net" in models.MODELS
    assert models.traceable_fields("user_tiny_net") == ("weight_decay", "rate")
    model = models.get_model("user_tiny_net", num_classes=3, weight_decay=1e-2)
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    logits, updates = model.apply(variables, x, training=True, rngs={"dropout": jax.random.key(1)},
                                  mutable=[nn.LOSSES])
    assert logits.shape == (2, 3)
    kernel = variables["params"]["Conv2D_0"]["kernel"]
    np.testing.assert_allclose(nn.regularization_loss(updates[nn.LOSSES]), 1e-2 * jnp.sum(kernel ** 2), rtol=1e-6)


# every registered model that builds from its defaults ("keras" needs a file: test_keras_graph.py)
@pytest.mark.parametrize("name", fast_only(sorted(set(models.MODELS) - {"keras"}), "stridednet", "simple_cnn"))
def test_every_model_builds_and_runs(name):
    model = models.get_model(name, num_classes=5)
    x = jnp.zeros((2, 64, 64, 3))
    variables = model.init(jax.random.key(0), x)
    y, _ = model.apply(variables, x, training=True, rngs={"dropout": jax.random.key(1)},
                       mutable=["batch_stats", nn.LOSSES])
    assert y.shape == (2, 5)


def _outputs(name, values, variables, x):
    """Train-mode (fixed dropout key) and eval-mode logits and sown penalties."""
    model = models.get_model(name, num_classes=4, **SMALL.get(name, {}), **values)
    train, train_updates = model.apply(variables, x, training=True, rngs={"dropout": jax.random.key(1)},
                                       mutable=["batch_stats", nn.LOSSES])
    evaluated, eval_updates = model.apply(variables, x, training=False, mutable=[nn.LOSSES])
    return train, train_updates.get(nn.LOSSES, {}), evaluated, eval_updates.get(nn.LOSSES, {})


@pytest.mark.parametrize("name", fast_only(BUILT_IN, "resnet", "stridednet", "simple_cnn"))
def test_traced_fields_give_what_the_same_python_values_give(name):
    fields = models.traceable_fields(name)
    assert fields and set(fields) <= set(VALUES)
    python = {f: VALUES[f] for f in fields}
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    model = models.get_model(name, num_classes=4, **SMALL.get(name, {}), **python)
    variables = model.init({"params": jax.random.key(0)}, x, training=False)
    variables = {k: v for k, v in variables.items() if k != nn.LOSSES}

    want = jax.jit(lambda: _outputs(name, python, variables, x))()
    traced = jax.jit(lambda v: _outputs(name, v, variables, x))
    got = traced({f: jnp.float32(v) for f, v in python.items()})
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    assert _leaves(want[1]), "the model sows no penalty"
    for a, b in zip(_leaves(got), _leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for f in fields:  # each field really is used by the model
        other = traced({**{k: jnp.float32(v) for k, v in python.items()}, f: jnp.float32(python[f] / 2)})
        assert not all(np.allclose(a, b) for a, b in zip(_leaves(other), _leaves(want))), f


def test_a_traced_zero_weight_decay_adds_what_a_python_zero_adds():
    # A Python zero sows no penalty; a traced zero sows zeros: the same loss and gradient.
    assert nn.l2_or_none(0.0) is None and nn.l2_or_none(0) is None
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    kwargs = dict(num_classes=4, widths=(4,), dense_units=8, head_dropout=0.0)
    variables = models.get_model("simple_cnn", weight_decay=0.0, **kwargs).init(jax.random.key(0), x)

    def loss(params, wd):
        logits, updates = models.get_model("simple_cnn", weight_decay=wd, **kwargs).apply(
            {"params": params}, x, mutable=[nn.LOSSES])
        return jnp.sum(logits) + nn.regularization_loss(updates.get(nn.LOSSES))

    python = jax.grad(loss)(variables["params"], 0.0)
    traced = jax.jit(jax.grad(loss))(variables["params"], jnp.float32(0.0))
    for a, b in zip(_leaves(traced), _leaves(python)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _keras_stridednet(classes):
    keras = pytest.importorskip("keras")
    from keras import layers

    reg = keras.regularizers.l2(5e-4)
    m = keras.Sequential([keras.Input((96, 96, 3))])
    m.add(layers.Conv2D(16, (7, 7), strides=(2, 2), padding="valid", kernel_initializer="he_normal", kernel_regularizer=reg))
    for w in (32, 64, 128):
        m.add(layers.Conv2D(w, (3, 3), padding="same", kernel_initializer="he_normal", kernel_regularizer=reg))
        m.add(layers.Activation("relu"))
        m.add(layers.BatchNormalization(axis=-1))
        m.add(layers.Conv2D(w, (3, 3), strides=(2, 2), padding="same", kernel_initializer="he_normal", kernel_regularizer=reg))
        m.add(layers.Activation("relu"))
        m.add(layers.BatchNormalization(axis=-1))
        m.add(layers.Dropout(0.25))
    m.add(layers.Flatten())
    m.add(layers.Dense(512, kernel_initializer="he_normal"))
    m.add(layers.Activation("relu"))
    m.add(layers.BatchNormalization())
    m.add(layers.Dropout(0.5))
    m.add(layers.Dense(classes))
    m.add(layers.Activation("softmax"))
    return m


@pytest.mark.parametrize("classes", [4, 102])
def test_stridednet_parameter_count_equals_keras(classes):
    keras_model = _keras_stridednet(classes)
    model = models.get_model("stridednet", num_classes=classes)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3))))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}))
    assert count == keras_model.count_params()
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert trainable == sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)


def test_resnet_stochastic_depth_drops_whole_branches_in_training_only_and_traces():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnnlab import models

    def build(rate):
        return models.get_model("resnet", num_classes=3, stage_filters=(8, 16), stage_depths=(2, 2),
                                stem_filters=8, head_dropout=0.0, drop_path_rate=rate)

    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 3))
    variables = build(0.0).init(jax.random.PRNGKey(1), x)

    def train(rate, key=2):
        out, _ = build(rate).apply(variables, x, training=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.PRNGKey(key)})
        return np.asarray(out)

    np.testing.assert_array_equal(build(0.6).apply(variables, x), build(0.0).apply(variables, x))
    plain, dropped = train(0.0), train(0.6)
    assert not np.allclose(plain, dropped)
    # the first block never drops (linear from 0); the rates are traceable (packed sweeps)
    traced = jax.jit(lambda r: build(r).apply(variables, x, training=True, mutable=["batch_stats"],
                                              rngs={"dropout": jax.random.PRNGKey(2)})[0])
    np.testing.assert_allclose(np.asarray(traced(jnp.float32(0.6))), dropped, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(traced(jnp.float32(0.0))), plain, rtol=1e-5, atol=1e-5)
    assert "drop_path_rate" in models.traceable_fields("resnet")
    assert "stochastic depth" in models.model_schema("resnet")["drop_path_rate"].doc
