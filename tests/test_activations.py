"""cnnlab.activations against Keras 3 (JAX backend): values, gradients, names and `get`."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnnlab import activations  # noqa: E402

keras = pytest.importorskip("keras")
from keras.src.activations import ALL_OBJECTS_DICT as KERAS_ACTIVATIONS  # noqa: E402

# Special points (kinks, thresholds, saturation edges) plus random values over a wide range.
_SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 6.0, 0.5, -0.5, 20.0, -20.0], np.float32)


def _inputs(shape=(4, 6, 8), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-8.0, 8.0, size=shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[: _SPECIAL.size] = _SPECIAL
    return flat.reshape(shape)


# (name, keyword options): every Keras activation, some with non-default options.
CASES = [(name, {}) for name in sorted(KERAS_ACTIVATIONS) if name != "threshold"] + [
    ("threshold", {"threshold": 0.5, "default_value": -2.0}),
    ("relu", {"negative_slope": 0.1}),
    ("relu", {"max_value": 6.0}),
    ("relu", {"max_value": 2.5}),
    ("relu", {"threshold": 1.0}),
    ("relu", {"negative_slope": 0.3, "max_value": 4.0}),
    ("relu", {"negative_slope": 0.3, "threshold": -1.0}),
    ("relu", {"negative_slope": 0.2, "max_value": 6.0, "threshold": 0.5}),
    ("leaky_relu", {"negative_slope": 0.01}),
    ("elu", {"alpha": 0.5}),
    ("celu", {"alpha": 2.0}),
    ("gelu", {"approximate": True}),
    ("gelu", {"approximate": False}),
    ("squareplus", {"b": 1.5}),
    ("soft_shrink", {"threshold": 1.0}),
    ("hard_shrink", {"threshold": 1.0}),
    ("softmax", {"axis": 0}),
    ("softmax", {"axis": 1}),
    ("softmax", {"axis": (1, 2)}),
    ("log_softmax", {"axis": 1}),
    ("log_softmax", {"axis": (0, 2)}),
    ("sparsemax", {"axis": 1}),
    ("sparsemax", {"axis": 0}),
    ("glu", {"axis": 1}),
    ("glu", {"axis": 0}),
]


def _id(case):
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


# Gradients where Keras fixes a convention (kinks, clipping, thresholds) or shifts for stability;
# the smooth ones follow from their values.
GRAD_CASES = [
    (name, {})
    for name in (
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "hard_sigmoid",
        "hard_silu",
        "hard_tanh",
        "hard_shrink",
        "soft_shrink",
        "sparse_plus",
        "sparse_sigmoid",
        "gelu",
        "mish",
    )
] + [
    ("relu", {"negative_slope": 0.3, "max_value": 4.0}),
    ("relu", {"threshold": 1.0}),
    ("relu", {"max_value": 6.0}),
    ("softmax", {"axis": 1}),
    ("log_softmax", {"axis": (0, 2)}),
    ("glu", {"axis": 0}),
]


def _evaluate(module):
    """Values of every CASE and gradients of every GRAD_CASE, in one jitted computation (one
    compilation per side keeps the test fast)."""

    @jax.jit
    def run(x, weights):
        values = [getattr(module, name)(x, **kwargs) for name, kwargs in CASES]
        grads = []
        for name, kwargs in GRAD_CASES:
            fn = getattr(module, name)
            grads.append(jax.grad(lambda v, fn=fn, kw=kwargs: jnp.sum(fn(v, **kw) * weights))(x))
        return values, grads

    args = (jnp.asarray(_inputs()), _WEIGHTS)
    values, grads = run.lower(*args).compile(_FAST_COMPILE)(*args)
    return (
        {_id(c): np.asarray(v) for c, v in zip(CASES, values, strict=True)},
        {_id(c): np.asarray(g) for c, g in zip(GRAD_CASES, grads, strict=True)},
    )


# Cheaper XLA:CPU code generation: halves the compile time of the big graph above.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_WEIGHTS = jnp.asarray(np.random.default_rng(2).normal(size=(8,)).astype(np.float32))


@pytest.fixture(scope="module")
def ours():
    return _evaluate(activations)


@pytest.fixture(scope="module")
def theirs():
    return _evaluate(keras.activations)


def test_names_match_keras():
    assert set(activations.names()) == set(KERAS_ACTIVATIONS)
    for name in KERAS_ACTIVATIONS:
        assert callable(getattr(activations, name))


@pytest.mark.parametrize("case_id", [_id(c) for c in CASES])
def test_values_match_keras(case_id, ours, theirs):
    got, expected = ours[0][case_id], theirs[0][case_id]
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case_id", [_id(c) for c in GRAD_CASES])
def test_gradients_match_keras(case_id, ours, theirs):
    """Same derivative conventions as Keras at kinks (relu'(0) = 0, relu6'(6) = 0, ...)."""
    np.testing.assert_allclose(ours[1][case_id], theirs[1][case_id], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "gelu", "softmax"])
def test_eager_matches_keras(name):
    x = jnp.asarray(_inputs((3, 8), seed=4))
    got = getattr(activations, name)(x)
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, getattr(keras.activations, name)(x), rtol=1e-6, atol=1e-6)


def test_low_precision_and_integer_inputs():
    x = np.linspace(-4, 4, 9)
    assert activations.gelu(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    out = activations.relu(np.arange(-3, 4))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), [0, 0, 0, 0, 1, 2, 3])
    assert activations.linear(x) is x


def test_examples_from_keras_docs():
    x = [-10.0, -5.0, 0.0, 5.0, 10.0]
    np.testing.assert_allclose(activations.relu(x), [0, 0, 0, 5, 10])
    np.testing.assert_allclose(activations.relu(x, negative_slope=0.5), [-5, -2.5, 0, 5, 10])
    np.testing.assert_allclose(activations.relu(x, max_value=5.0), [0, 0, 0, 5, 5])
    np.testing.assert_allclose(activations.relu(x, threshold=5.0), [0, 0, 0, 0, 10])
    np.testing.assert_allclose(activations.softmax(jnp.zeros((2, 4))), jnp.full((2, 4), 0.25))


def test_glu_rejects_odd_axis():
    with pytest.raises(ValueError, match="even"):
        activations.glu(jnp.ones((3, 5)))


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        activations.softmax(jnp.ones((2, 3)), 0)  # type: ignore[misc]
    # threshold's two arguments are required, positional allowed (Keras' signature).
    np.testing.assert_allclose(activations.threshold(jnp.array([0.0, 2.0]), 1.0, -1.0), [-1, 2])


# --- get / serialize ---------------------------------------------------------------------------


def test_get_none_is_linear():
    assert activations.get(None) is activations.linear
    assert keras.activations.get(None).__name__ == "linear"


@pytest.mark.parametrize("name", sorted(KERAS_ACTIVATIONS))
def test_get_by_name_matches_keras(name):
    fn = activations.get(name)
    assert fn is getattr(activations, name)
    assert fn.__name__ == keras.activations.get(name).__name__


def test_get_aliases():
    assert activations.get("swish") is activations.silu
    assert activations.get("hard_swish") is activations.hard_silu


def test_get_config_dicts():
    # Keras 3's own serialization of a function...
    keras_cfg = keras.saving.serialize_keras_object(keras.activations.relu)
    assert activations.get(keras_cfg) is activations.relu
    full = {
        "module": "keras.activations",
        "class_name": "function",
        "config": "gelu",
        "registered_name": "gelu",
    }
    assert activations.get(full) is activations.gelu
    # ... and the {"class_name": name, "config": options} form.
    assert activations.get({"class_name": "tanh", "config": {}}) is activations.tanh
    relu6ish = activations.get({"class_name": "relu", "config": {"max_value": 6.0}})
    assert isinstance(relu6ish, functools.partial)
    x = _inputs()
    np.testing.assert_allclose(relu6ish(x), keras.activations.relu(x, max_value=6.0))


def test_get_callable_unchanged():
    def custom(x):
        return x * 2

    assert activations.get(custom) is custom
    assert activations.get(keras.activations.relu) is keras.activations.relu


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="relu_x") as info:
        activations.get("relu_x")
    message = str(info.value)
    for name in ("relu", "gelu", "swish", "sparsemax"):
        assert name in message
    with pytest.raises(ValueError, match="Relu"):
        activations.get("Relu")  # case-sensitive, as in Keras
    with pytest.raises(ValueError, match="nope"):
        activations.get({"class_name": "nope", "config": {}})
    with pytest.raises(ValueError, match="Could not interpret"):
        activations.get(3)


@pytest.mark.parametrize("name", sorted(KERAS_ACTIVATIONS))
def test_serialize_matches_keras(name):
    expected = keras.activations.serialize(getattr(keras.activations, name))
    assert activations.serialize(getattr(activations, name)) == expected
    assert activations.get(activations.serialize(getattr(activations, name))) is getattr(
        activations, expected
    )


def test_serialize_partial_round_trips():
    fn = functools.partial(activations.leaky_relu, negative_slope=0.1)
    config = activations.serialize(fn)
    assert config == {"class_name": "leaky_relu", "config": {"negative_slope": 0.1}}
    back = activations.get(config)
    x = _inputs()
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(fn(x)))


def test_serialize_rejects_custom_functions():
    with pytest.raises(ValueError, match="not a built-in"):
        activations.serialize(lambda x: x)
