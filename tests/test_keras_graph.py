"""Keras graphs into cnnlab (cnnlab/keras_graph.py): the keras.applications, a hand-built DAG
of every merge/activation/reshaping/normalization layer, nested and shared layers, the one
error for unsupported layers, and the 'keras' model trained, evaluated, predicted and packed.

Outputs are compared as ``max|cnnlab - keras| / max|keras|`` (float32, <= 1e-5) in inference
mode and in training mode (BatchNormalization on batch statistics; dropout rates set to 0 in
the Keras model before the import, so both sides run without it). Convolutions run as XLA's
(``CNNLAB_CONV_FORMULATION=xla``), as Keras' do: the other formulations round differently.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from helpers import tiny_config  # noqa: E402

from cnnlab import interop, keras_graph, models  # noqa: E402

MAX_REL = 1e-5


@pytest.fixture(autouse=True)
def _xla_convolutions(monkeypatch):
    monkeypatch.setenv("CNNLAB_CONV_FORMULATION", "xla")


def _rel(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    return float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def _no_dropout(keras_model):
    for layer in keras_model._flatten_layers():
        for attr in ("rate", "drop_path_rate"):
            if isinstance(getattr(layer, attr, None), float):
                setattr(layer, attr, 0.0)


def _randomize_stats(keras_model, seed=0):
    """Moving statistics away from 0/1, so inference mode checks they are used."""
    rng = np.random.default_rng(seed)
    for w in keras_model.weights:
        if w.name in ("moving_mean", "mean"):
            w.assign(rng.normal(0.0, 0.1, tuple(w.shape)).astype("float32"))
        elif w.name in ("moving_variance", "variance"):
            w.assign(rng.uniform(0.5, 2.0, tuple(w.shape)).astype("float32"))
    for layer in keras_model._flatten_layers():
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:
            layer.finalize_state()  # Keras computes with the weights as of its last adapt or load


def _compare(keras_model, x):
    """``(inference, training)`` relative differences of the imported model to Keras'."""
    _no_dropout(keras_model)
    module, variables = interop.from_keras(keras_model)
    diff = interop.compare_with_keras(keras_model, module, variables, x)
    return diff["inference"], diff["training"]


# --------------------------------------------------------------------------- applications

#: (application, input size). The fast set is none of them on a shared 2-core machine, where
#: each takes 40-90 s (Keras builds it, then both sides compile): all are slow-marked. A batch
#: norm in training mode over the last feature maps normalizes only batch x height x width
#: numbers per channel: at 1x1 maps with batch 2 that is two numbers, pushed to about +-1, and
#: float rounding turns into sign flips (EfficientNetB0 at 32 px: 0.88 on CI's CPU, 1e-6 on
#: another). Hence batch 4, and 64 px for the families whose last maps are then 2x2.
APPLICATIONS = [
    ("VGG16", 32), ("VGG19", 32),
    ("ResNet50", 32), ("ResNet101", 32), ("ResNet152", 32),
    ("ResNet50V2", 64), ("ResNet101V2", 64), ("ResNet152V2", 64),
    ("MobileNet", 32), ("MobileNetV2", 32), ("MobileNetV3Small", 32), ("MobileNetV3Large", 32),
    *((f"EfficientNetB{i}", 64) for i in range(8)),
    *((f"EfficientNetV2B{i}", 64) for i in range(4)),
    ("DenseNet121", 64), ("DenseNet169", 64), ("DenseNet201", 64),
    ("InceptionV3", 75), ("Xception", 71), ("ConvNeXtTiny", 32),
]


#: Checked in CI's slow step: one of each family. The deeper variants of a family (ResNet101,
#: EfficientNetB7, ...) use the same layer classes; they run with CNNLAB_ALL_APPLICATIONS=1.
REPRESENTATIVE = {"VGG16", "ResNet50", "ResNet50V2", "MobileNet", "MobileNetV2", "MobileNetV3Small",
                  "EfficientNetB0", "EfficientNetV2B0", "DenseNet121", "InceptionV3", "Xception",
                  "ConvNeXtTiny"}


@pytest.mark.slow
@pytest.mark.parametrize("name,size", APPLICATIONS, ids=[a for a, _ in APPLICATIONS])
def test_application_imports_with_equal_outputs(name, size):
    if name not in REPRESENTATIVE and not os.environ.get("CNNLAB_ALL_APPLICATIONS"):
        pytest.skip("a deeper variant of a checked family: set CNNLAB_ALL_APPLICATIONS=1")
    keras_model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10)
    _randomize_stats(keras_model)
    x = np.random.default_rng(1).uniform(0.0, 255.0, (4, size, size, 3)).astype("float32")
    infer, train = _compare(keras_model, x)
    print(f"{name} {size}x{size}: inference {infer:.2e}, training {train:.2e}")
    assert infer <= MAX_REL and train <= MAX_REL, (infer, train)


# --------------------------------------------------------------------------- hand-built graphs


def _dag():
    """Two inputs; every merge, activation, padding/cropping, reshaping and normalization layer
    the importer maps; a shared layer; a nested functional model and a nested Sequential;
    keras.ops arithmetic; two outputs."""
    L = keras.layers
    a_in, b_in = keras.Input((12, 12, 3), name="a"), keras.Input((12, 12, 3), name="b")
    x = L.Rescaling([0.5, 1.0, 2.0], offset=0.1)(a_in)
    x = L.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 0.5])(x)
    y = L.Normalization(axis=-1)(b_in)  # adapted state, set in _set_normalization
    x = L.Conv2D(8, 3, padding="same")(x)
    y = L.SeparableConv2D(8, 3, padding="same", depth_multiplier=2)(y)
    shared = L.Conv2D(8, 1, name="shared")
    x, y = shared(x), shared(y)
    x = L.BatchNormalization(momentum=0.9, epsilon=1e-4)(x)
    merged = [L.Add()([x, y]), L.Subtract()([x, y]), L.Multiply()([x, y]), L.Average()([x, y]),
              L.Maximum()([x, y]), L.Minimum()([x, y])]
    z = L.Concatenate()(merged)
    acts = [L.ReLU()(z), L.ReLU(max_value=6.0)(z), L.ReLU(negative_slope=0.1, threshold=0.5)(z),
            L.ReLU(max_value=2.0, negative_slope=0.2)(z), L.LeakyReLU(negative_slope=0.2)(z),
            L.Softmax()(z)]
    acts += [L.Activation(a)(z) for a in ("relu6", "hard_swish", "hard_sigmoid", "swish", "silu",
                                          "gelu", "sigmoid", "tanh", "elu", "selu", "softplus",
                                          "softsign", "mish", "exponential", "linear", "leaky_relu")]
    z = L.Concatenate(axis=-1)(acts)
    z = L.DepthwiseConv2D(3, padding="same", depth_multiplier=1)(z)
    z = L.LayerNormalization(epsilon=1e-5)(z)
    z = L.ZeroPadding2D(((1, 2), (0, 1)))(z)
    z = L.Cropping2D(((2, 1), (1, 0)))(z)
    z = L.UpSampling2D(2)(z)
    z = L.UpSampling2D((1, 2), interpolation="bilinear")(z)
    z = L.SpatialDropout2D(0.3)(z)
    z = L.MaxPooling2D(2)(z)
    z = L.AveragePooling2D(2, padding="same")(z)
    inner_in = keras.Input(z.shape[1:])
    inner = keras.Model(inner_in, L.Conv2D(4, 1, activation="relu")(inner_in) * 0.5 + 1.0, name="inner")
    seq = keras.Sequential([L.BatchNormalization(), L.Conv2D(4, 1)], name="seq")
    z = seq(inner(z))
    pooled = L.GlobalAveragePooling2D(keepdims=True)(z)
    pooled = L.Reshape((4,))(pooled)
    maxed = L.GlobalMaxPooling2D()(z)
    head = L.Dropout(0.5)(L.Concatenate()([pooled, maxed, L.Flatten()(z)]))
    return keras.Model([a_in, b_in], [L.Dense(5, activation="softmax")(head), L.Dense(3)(head)])


@pytest.mark.slow
def test_a_graph_deeper_than_pythons_recursion_limit_imports():
    """EfficientNetB1 and deeper exceeded Python's recursion limit in a recursive walk."""
    inputs = x = keras.Input((4, 4, 2))
    for _ in range(400):  # 800 calls deep
        x = keras.layers.Average()([x, keras.layers.ReLU()(x)])
    keras_model = keras.Model(inputs, x)
    module, variables = interop.from_keras(keras_model)
    data = np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype("float32")
    diff = interop.compare_with_keras(keras_model, module, variables, data)
    assert diff["inference"] <= MAX_REL and diff["training"] <= MAX_REL, diff


def test_hand_built_dag_imports_with_equal_outputs():
    keras_model = _dag()
    _randomize_stats(keras_model)
    rng = np.random.default_rng(2)
    x = [rng.normal(0.0, 1.0, (2, 12, 12, 3)).astype("float32") for _ in range(2)]
    module, variables = interop.from_keras(keras_model)
    assert isinstance(module, keras_graph.KerasGraph)
    assert set(variables["params"]["shared"]) == {"kernel", "bias"}  # one shared layer
    assert "seq" in variables["batch_stats"] and "inner" in variables["params"]  # nested models
    infer, train = _compare(keras_model, x)
    assert infer <= MAX_REL and train <= MAX_REL, (infer, train)


def test_convnext_layer_scale_and_stochastic_depth():
    from keras.src.applications.convnext import LayerScale, StochasticDepth

    inputs = keras.Input((4, 4, 6))
    branch = LayerScale(0.5, 6)(keras.layers.Dense(6)(inputs))
    keras_model = keras.Model(inputs, keras.layers.Add()([inputs, StochasticDepth(0.3)(branch)]))
    keras_model.layers[2].gamma.assign(np.linspace(-1, 1, 6).astype("float32"))
    module, variables = interop.from_keras(keras_model)
    np.testing.assert_array_equal(variables["params"][keras_model.layers[2].name]["gamma"],
                                  np.linspace(-1, 1, 6).astype("float32"))
    x = np.random.default_rng(3).normal(size=(2, 4, 4, 6)).astype("float32")
    assert _rel(module.apply(variables, x), keras_model(x, training=False)) <= MAX_REL
    # In training each example's branch is dropped (or scaled by 1/keep) as a whole.
    y, _ = module.apply(variables, x, training=True, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.key(0)})
    branch_out = np.asarray(y) - x
    full = np.asarray(module.apply(variables, x)) - x
    for i in range(2):
        ratio = branch_out[i] / full[i]
        assert np.allclose(ratio, 0.0, atol=1e-5) or np.allclose(ratio, 1 / 0.7, rtol=1e-5)


def test_unsupported_layers_are_listed_in_one_error():
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.GaussianNoise(0.1, name="noise_a")(x)
    x = L.GaussianNoise(0.1, name="noise_b")(x)
    x = L.Lambda(lambda t: t * 2, name="double")(x)
    x = L.Conv2D(4, 3, padding="same", name="ok")(x)
    x = L.Flatten()(x)
    keras_model = keras.Model(inputs, L.Dense(2, name="dense_lora", lora_rank=2)(x))
    with pytest.raises(interop.InteropError) as err:
        interop.from_keras(keras_model)
    message = str(err.value)
    assert "GaussianNoise: 2 (first: 'noise_a')" in message
    assert "Lambda: 1 (first: 'double')" in message
    assert "Dense(lora_rank=2, lora_alpha=2): 1 (first: 'dense_lora')" in message
    assert "4 layer(s) of 3 kind(s)" in message and "Conv2D" not in message.split("\n")[1:-1]


def test_chains_still_import_as_sequential():
    keras_model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                                    keras.layers.Flatten(), keras.layers.Dense(2)])
    module, variables = interop.from_keras(keras_model)
    assert isinstance(module, interop.Sequential) and "layers_0" in variables["params"]


# --------------------------------------------------------------------------- model 'keras'


def _tiny_keras_file(path, num_classes, size=16):
    L = keras.layers
    inputs = keras.Input((size, size, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same")(inputs)
    x = L.BatchNormalization(momentum=0.8, epsilon=1e-2)(x)
    a = L.ReLU(6.0)(x)
    b = L.DepthwiseConv2D(3, padding="same", activation="hard_swish")(x)
    x = L.Concatenate()([a, L.Add()([a, b])])
    x = L.GlobalAveragePooling2D()(x)
    keras_model = keras.Model(inputs, L.Dense(num_classes, activation="softmax")(x))
    keras_model.save(path)
    return keras_model


def test_keras_model_starts_from_the_file_and_gives_logits(tmp_path):
    path = str(tmp_path / "tiny.keras")
    keras_model = _tiny_keras_file(path, 4)
    model = models.get_model("keras", num_classes=4, path=path)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           jnp.zeros((1, 16, 16, 3)), training=False)
    conv, bn = keras_model.layers[1], keras_model.layers[2]
    np.testing.assert_array_equal(variables["params"][conv.name]["kernel"], conv.kernel)
    np.testing.assert_array_equal(variables["batch_stats"][bn.name]["moving_variance"], bn.moving_variance)
    x = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype("float32")
    logits = model.apply(variables, x)
    assert _rel(jax.nn.softmax(logits), keras_model(x)) <= MAX_REL
    _, updated = model.apply(variables, x, training=True, mutable=["batch_stats"])
    keras_model(x, training=True)  # Keras updates its moving statistics with momentum 0.8
    assert _rel(updated["batch_stats"][bn.name]["moving_mean"], bn.moving_mean) <= MAX_REL

    with pytest.raises(ValueError, match="has 4 units but the data has num_classes=3.*new_head=True"):
        models.get_model("keras", num_classes=3, path=path).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    fresh = models.get_model("keras", num_classes=3, path=path, new_head=True)
    v3 = fresh.init({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 3)))
    assert v3["params"][keras_model.layers[-1].name]["kernel"].shape == (16, 3)
    with pytest.raises(ValueError, match="model.kwargs.path"):
        models.get_model("keras", num_classes=3)
    assert "path" in models.model_schema("keras") and models.model_schema("keras")["path"].doc


@pytest.mark.parametrize("path,reason", [("", "is required"), ("model.h5", "must be a .keras file"),
                                         ("missing.keras", "no such file")])
def test_a_bad_keras_path_is_refused_before_the_run_records_anything(tmp_path, path, reason):
    from cnnlab.schema import ConfigError
    from cnnlab.train import train_and_evaluate

    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"model.kwargs.path.*{reason}"):
        train_and_evaluate(_keras_config(path and str(tmp_path / path)), str(workdir))
    assert not workdir.exists()


def _keras_config(path, learning_rate=3e-3):
    c = tiny_config()
    c.model.name = "keras"
    c.model.kwargs = ml_collections.ConfigDict({"path": path})
    c.optimizer.learning_rate = learning_rate
    return c


def test_cnnlab_train_evaluate_predict_and_pack_a_keras_file(tmp_path):
    from cnnlab import load_run
    from cnnlab.train import train_and_evaluate, train_trials

    path = str(tmp_path / "tiny.keras")
    _tiny_keras_file(path, tiny_config().data.synthetic_num_classes)
    workdir = str(tmp_path / "run")
    train_and_evaluate(_keras_config(path), workdir)
    run = load_run(workdir)
    images = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    probs = np.asarray(run.predict(images))
    assert probs.shape == (3, tiny_config().data.synthetic_num_classes)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)

    configs = [_keras_config(path, lr) for lr in (3e-3, 1e-3)]
    outcomes, _ = train_trials(configs, [str(tmp_path / f"packed{k}") for k in range(2)])
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
