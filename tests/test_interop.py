"""Keras interop: the tutorial's Keras StridedNet into cnnlab, cnnlab models into Keras, the
round trip, refused layers and models, and ``cnnlab export`` of a trained run."""

import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from helpers import tiny_config  # noqa: E402
from test_models import _keras_stridednet  # noqa: E402

from cnnlab import interop, models  # noqa: E402
from cnnlab import nn as cnn  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


def _draw(rng, name, shape):
    """A random weight by its name: kernels at He scale, biases and BatchNormalization
    statistics far from 0/1."""
    if name == "moving_variance":
        return rng.uniform(0.5, 2.0, shape).astype("float32")
    if name == "gamma":
        return rng.uniform(0.5, 1.5, shape).astype("float32")
    if len(shape) == 1:
        return rng.normal(0.0, 0.5, shape).astype("float32")
    return rng.normal(0.0, (2.0 / np.prod(shape[:-1])) ** 0.5, shape).astype("float32")


def _randomize(keras_model, seed=0):
    rng = np.random.default_rng(seed)
    for w in keras_model.weights:
        w.assign(_draw(rng, w.name, tuple(w.shape)))


def _keras_out(keras_model, x):
    return np.asarray(keras_model.predict(x, verbose=0))  # model(x, training=False), compiled once


def _out(module, variables, x):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, training=False))(variables, x))


def _init(module, shape, seed=0):
    """Random variables of ``module`` for inputs ``shape``, drawn in NumPy (no compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
    shapes = {k: flax.core.unfreeze(v) for k, v in shapes.items() if k in ("params", "batch_stats")}
    return jax.tree_util.tree_map_with_path(lambda path, a: _draw(rng, str(path[-1].key), a.shape), shapes)


def _images(shape, seed=1):
    return np.random.default_rng(seed).normal(0.0, 1.0, shape).astype("float32")


def test_keras_stridednet_imports_with_equal_outputs():
    keras_model = _keras_stridednet(4)
    _randomize(keras_model)
    module, variables = interop.from_keras(keras_model)
    assert isinstance(module.layers[0], cnn.Conv2D) and module.layers[0].strides == (2, 2)
    assert isinstance(module.layers[-1], cnn.Activation) and module.layers[-1].activation == "softmax"
    bn = keras_model.layers[3]
    np.testing.assert_array_equal(variables["batch_stats"]["layers_3"]["moving_mean"], bn.moving_mean.numpy())
    assert module.layers[3].momentum == bn.momentum and module.layers[3].epsilon == bn.epsilon
    x = _images((3, 96, 96, 3))
    expected = _keras_out(keras_model, x)
    got = _out(module, variables, x)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert not np.allclose(expected, expected[:1])  # the inputs are told apart
    # The logits too (the softmax could hide differences).
    logits = keras.Model(keras_model.inputs, keras_model.layers[-2].output)
    np.testing.assert_allclose(_out(interop.Sequential(module.layers[:-1]), variables, x),
                               _keras_out(logits, x), rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("name,kwargs", [
    ("stridednet", dict(widths=(8,), stem_filters=4, dense_units=16)),
    ("simple_cnn", dict(widths=(8, 16), dense_units=16)),
    ("simple_cnn", dict(widths=(8,), dense_units=16, global_pool=True, padding="valid")),
])
def test_cnnlab_models_export_to_keras_with_equal_outputs_and_round_trip(name, kwargs):
    model = models.get_model(name, num_classes=5, **kwargs)
    variables = _init(model, (1, 40, 40, 3))
    keras_model = interop.to_keras(model, variables, (40, 40, 3))
    x = _images((2, 40, 40, 3))
    expected = _out(model, variables, x)
    np.testing.assert_allclose(_keras_out(keras_model, x), expected, rtol=RTOL, atol=ATOL)
    assert keras_model.count_params() == sum(a.size for a in jax.tree_util.tree_leaves(variables))
    module, back = interop.from_keras(keras_model)
    np.testing.assert_allclose(_out(module, back, x), expected, rtol=RTOL, atol=ATOL)


def test_every_mapped_layer_kind_round_trips():
    layers = (cnn.Conv2D(6, 3, padding="same", activation="relu"), cnn.DepthwiseConv2D(3, depth_multiplier=2),
              cnn.SeparableConv2D(8, 3, padding="same"), cnn.AveragePooling2D(2, strides=(2, 1)),
              cnn.Conv2DTranspose(4, 3, strides=2), cnn.MaxPooling2D(3, padding="same"),
              cnn.BatchNormalization(momentum=0.9, epsilon=1e-2), interop.Rescaling(0.5, 1.0),
              cnn.GlobalAveragePooling2D(keepdims=True), cnn.Flatten(), cnn.Dropout(0.3),
              cnn.Dense(7, activation="tanh"), cnn.Activation("softmax"))
    model = interop.Sequential(layers)
    variables = _init(model, (1, 12, 12, 3))
    keras_model = interop.to_keras(model, variables, (12, 12, 3))
    assert [type(layer).__name__ for layer in keras_model.layers] == [type(layer).__name__ for layer in layers]
    x = _images((2, 12, 12, 3))
    expected = _out(model, variables, x)
    np.testing.assert_allclose(_keras_out(keras_model, x), expected, rtol=RTOL, atol=ATOL)
    module, back = interop.from_keras(keras_model)
    np.testing.assert_allclose(_out(module, back, x), expected, rtol=RTOL, atol=ATOL)


def test_a_functional_keras_chain_imports_with_equal_outputs():
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Rescaling(1 / 255.0, offset=-0.5)(inputs)
    x = keras.layers.Conv2D(6, 3, strides=(2, 1), padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(center=False)(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Softmax()(keras.layers.Dense(3)(x))
    keras_model = keras.Model(inputs, outputs)
    _randomize(keras_model)
    module, variables = interop.from_keras(keras_model)
    assert [type(layer).__name__ for layer in module.layers] == [
        "Rescaling", "Conv2D", "BatchNormalization", "GlobalMaxPooling2D", "Dense", "Activation"]
    x = _images((4, 10, 10, 3)) * 255.0
    np.testing.assert_allclose(_out(module, variables, x), _keras_out(keras_model, x), rtol=RTOL, atol=ATOL)


def test_unsupported_layers_and_models_are_named():
    odd = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                            keras.layers.GaussianNoise(0.1, name="noise")])
    with pytest.raises(ValueError, match="GaussianNoise: 1 \\(first: 'noise'\\)"):
        interop.from_keras(odd)
    renorm = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(renorm=True, name="bn")])
    with pytest.raises(ValueError, match="BatchNormalization\\(renorm=True.*\\): 1 \\(first: 'bn'\\)"):
        interop.from_keras(renorm)
    inp = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(3, 3, padding="same", name="branch")(inp)
    branched = keras.Model(inp, keras.layers.Add()([inp, y]))  # graphs import (tests/test_keras_graph.py)
    assert "branch" in interop.from_keras(branched)[1]["params"]

    class Scaled(flax_nn.Module):  # an operation between layers that Keras has no layer for
        @flax_nn.compact
        def __call__(self, x):
            return cnn.Dense(3)(cnn.Flatten()(x) * 2.0)

    variables = _init(Scaled(), (1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"Scaled applies `mul` to a layer's output; between cnnlab layers"):
        interop.to_keras(Scaled(), variables, (4, 4, 3))

    class FlaxDense(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            return flax_nn.Dense(3)(cnn.Flatten()(x))

    variables = _init(FlaxDense(), (1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"flax\.linen\.linear\.Dense at Dense_0 is not a cnnlab layer"):
        interop.to_keras(FlaxDense(), variables, (4, 4, 3))
    reflect = interop.Sequential((cnn.Conv2D(2, 3, padding="same", padding_mode="reflect"),))
    variables = _init(reflect, (1, 6, 6, 3))
    with pytest.raises(ValueError, match="Conv2D has no padding_mode='reflect'"):
        interop.to_keras(reflect, variables, (6, 6, 3))


def test_importing_interop_does_not_import_keras_and_a_missing_keras_says_how_to_install():
    code = ("import sys, cnnlab.interop as interop; assert 'keras' not in sys.modules, 'keras imported'; "
            "sys.modules['keras'] = None; interop.from_keras(None)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1 and "keras imported" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'ImportError: cnnlab.interop needs Keras 3: pip install "cnnlab[keras]".')


@pytest.mark.slow
def test_export_writes_a_keras_file_predicting_as_the_run(tmp_path):
    from cnnlab import load_run
    from cnnlab.train import train_and_evaluate

    config = tiny_config()
    config.num_epochs = 1
    run_dir = tmp_path / "run"
    train_and_evaluate(config, str(run_dir))
    out = tmp_path / "model.keras"
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "export", f"--workdir={run_dir}", "--format=keras",
                           str(out)], capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert proc.returncode == 0 and f"Wrote {out}" in proc.stdout, proc.stderr[-3000:]
    loaded = keras.saving.load_model(str(out))
    run = load_run(str(run_dir))

    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    expected = run.predict(images)
    assert expected.shape == (6, len(run.class_names)) and not np.allclose(expected, expected[:1])
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=RTOL, atol=1e-6)
    # Other sizes are resized inside the Keras model to the run's.
    other = loaded.predict(np.zeros((1, 2 * size, size + 3, 3), np.uint8), verbose=0)
    assert other.shape == (1, len(run.class_names)) and np.isclose(other.sum(), 1.0)

    # A mean_std run: its recorded channel statistics become a Normalization layer.
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "normalization": "mean_std"}))
    (run_dir / "preprocessing.json").write_text(json.dumps(
        {"normalization": "mean_std", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}))
    interop.export_main([f"--workdir={run_dir}", "--which=latest", str(tmp_path / "mean_std.keras")])
    loaded = keras.saving.load_model(str(tmp_path / "mean_std.keras"))
    expected = load_run(str(run_dir), which="latest").predict(images)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=RTOL, atol=1e-6)

    # A run with test-time mirror averaging: the exported model averages too, as predict does.
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "eval_flip": True}))
    interop.export_main([f"--workdir={run_dir}", "--which=latest", str(tmp_path / "flip.keras")])
    loaded = keras.saving.load_model(str(tmp_path / "flip.keras"))
    flipped = load_run(str(run_dir), which="latest").predict(images)
    assert not np.allclose(flipped, expected, atol=1e-4)  # the mirror changes the probabilities
    np.testing.assert_allclose(loaded.predict(images, verbose=0), flipped, rtol=RTOL, atol=1e-6)

    with pytest.raises(ValueError, match="must end in .keras"):
        interop.export_main([f"--workdir={run_dir}", str(tmp_path / "model.h5")])
