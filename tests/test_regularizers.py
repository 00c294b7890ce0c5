"""cnnlab.regularizers against Keras 3 (JAX backend): penalties, gradients, configs and `get`."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnnlab import regularizers  # noqa: E402

keras = pytest.importorskip("keras")
from keras.src.regularizers import ALL_OBJECTS_DICT as KERAS_REGULARIZERS  # noqa: E402

CASES = [
    ("L1", {}),
    ("L1", {"l1": 0.3}),
    ("L2", {}),
    ("L2", {"l2": 0.25}),
    ("L1L2", {}),
    ("L1L2", {"l1": 0.1}),
    ("L1L2", {"l2": 0.2}),
    ("L1L2", {"l1": 0.05, "l2": 0.15}),
    ("OrthogonalRegularizer", {}),
    ("OrthogonalRegularizer", {"factor": 0.5, "mode": "columns"}),
]


def _id(case):
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def _array(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _shapes(name):
    return [(6, 4), (4, 6)] if name == "OrthogonalRegularizer" else [(6, 4), (3, 3, 2, 4)]


# Cheaper XLA:CPU code generation for the one-shot batch below.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _evaluate(module):
    """Penalty and gradient of every CASE on every shape, in one jitted computation (one
    compilation per library keeps the file fast)."""
    inputs = {(_id(c), s): _array(s, seed=i) for c in CASES for i, s in enumerate(_shapes(c[0]))}

    def run(inputs):
        out = {}
        for name, kwargs in CASES:
            reg = getattr(module, name)(**kwargs)
            for shape in _shapes(name):
                x = inputs[_id((name, kwargs)), shape]
                out[_id((name, kwargs)), shape] = (reg(x), jax.grad(reg)(x))
        return out

    return jax.jit(run).lower(inputs).compile(_FAST_COMPILE)(inputs)


@pytest.fixture(scope="module")
def ours():
    return _evaluate(regularizers)


@pytest.fixture(scope="module")
def theirs():
    return _evaluate(keras.regularizers)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_penalty_and_gradient_equal_keras(case, ours, theirs):
    for shape in _shapes(case[0]):
        (value, grad), (expected_value, expected_grad) = (
            ours[_id(case), shape],
            theirs[_id(case), shape],
        )
        assert value.shape == () and value.dtype == jnp.float32
        np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_eager_call_equals_keras():
    x = _array((6, 4))
    for ours, theirs in [
        (regularizers.L1L2(0.1, 0.2), keras.regularizers.L1L2(0.1, 0.2)),
        (regularizers.OrthogonalRegularizer(), keras.regularizers.OrthogonalRegularizer()),
    ]:
        got = ours(x)
        assert isinstance(got, jax.Array)
        np.testing.assert_allclose(got, theirs(x), rtol=1e-6)


def test_keras_formulas():
    x = _array((5, 3))
    ref = np.asarray(x, np.float64)
    np.testing.assert_allclose(regularizers.L2(0.5)(x), 0.5 * np.sum(ref**2), rtol=1e-6)  # no 1/2
    np.testing.assert_allclose(regularizers.L1(0.5)(x), 0.5 * np.sum(np.abs(ref)), rtol=1e-6)
    np.testing.assert_allclose(
        regularizers.L1L2(0.1, 0.2)(x),
        0.1 * np.sum(np.abs(ref)) + 0.2 * np.sum(ref**2),
        rtol=1e-6,
    )
    assert float(regularizers.L1L2()(x)) == 0.0
    assert float(regularizers.Regularizer()(x)) == 0.0
    # Orthogonal rows -> zero penalty; identical rows -> factor * 0.5 * 2 (|cos| = 1 for all).
    np.testing.assert_allclose(regularizers.OrthogonalRegularizer(1.0)(jnp.eye(3)), 0.0)
    np.testing.assert_allclose(regularizers.OrthogonalRegularizer(1.0)(jnp.ones((3, 2))), 1.0)


def test_orthogonal_regularizer_validation():
    with pytest.raises(ValueError, match="rank 2"):
        regularizers.OrthogonalRegularizer()(jnp.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="mode"):
        regularizers.OrthogonalRegularizer(mode="diagonal")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_invalid_factors_raise(bad):
    for cls, arg in ((regularizers.L1, "l1"), (regularizers.L2, "l2"), (regularizers.L1L2, "l1")):
        with pytest.raises(ValueError, match=arg):
            cls(**{arg: bad})
    with pytest.raises(ValueError, match="factor"):
        regularizers.OrthogonalRegularizer(factor=bad)


def test_none_factors_fall_back_like_keras():
    assert regularizers.L1(None).l1 == 0.01
    assert regularizers.L2(None).l2 == 0.01
    assert regularizers.L1L2(None, None).get_config() == {"l1": 0.0, "l2": 0.0}


# --- configs and get ---------------------------------------------------------------------------


def _same_config(ours, theirs):
    """Equal configs. Keras stores L1's and OrthogonalRegularizer's factor as a float32 tensor,
    so its config reads back e.g. 0.009999999776482582 for 0.01; cnnlab keeps the Python float."""
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        expected = theirs[key]
        if isinstance(value, float):
            assert value == pytest.approx(expected, rel=1e-7)
        else:
            assert value == expected


def test_names_match_keras():
    keras_names = set(KERAS_REGULARIZERS) - {"Regularizer", "regularizer"}
    assert set(regularizers.names()) == keras_names | {"l1_l2"}


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_get_config_matches_keras_and_round_trips(case):
    name, kwargs = case
    ours = getattr(regularizers, name)(**kwargs)
    theirs = getattr(keras.regularizers, name)(**kwargs)
    _same_config(ours.get_config(), theirs.get_config())
    clone = type(ours).from_config(ours.get_config())
    assert type(clone) is type(ours) and clone.get_config() == ours.get_config()
    loaded = regularizers.get(keras.regularizers.serialize(theirs))
    assert type(loaded) is type(ours)
    _same_config(loaded.get_config(), ours.get_config())
    assert regularizers.get(regularizers.serialize(ours)).get_config() == ours.get_config()


@pytest.mark.parametrize(
    "identifier, cls",
    [
        ("l1", "L1"),
        ("L1", "L1"),
        ("l2", "L2"),
        ("L2", "L2"),
        ("l1l2", "L1L2"),
        ("l1_l2", "L1L2"),
        ("L1L2", "L1L2"),
        ("orthogonal_regularizer", "OrthogonalRegularizer"),
        ("OrthogonalRegularizer", "OrthogonalRegularizer"),
    ],
)
def test_get_by_name(identifier, cls):
    obj = regularizers.get(identifier)
    assert type(obj) is getattr(regularizers, cls)
    _same_config(obj.get_config(), getattr(keras.regularizers, cls)().get_config())


def test_get_other_forms():
    assert regularizers.get(None) is None
    instance = regularizers.L2(1e-4)
    assert regularizers.get(instance) is instance
    assert type(regularizers.get(regularizers.L1)) is regularizers.L1

    def custom(x):
        return 0.01 * jnp.sum(jnp.abs(x))

    assert regularizers.get(custom) is custom
    reg = regularizers.get({"class_name": "L2", "config": {"l2": 1e-4}})
    assert isinstance(reg, regularizers.L2) and reg.l2 == 1e-4
    assert regularizers.l2 is regularizers.L2 and regularizers.l1_l2 is regularizers.L1L2


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="l3") as info:
        regularizers.get("l3")
    for name in ("l1", "l2", "l1_l2", "L1L2", "orthogonal_regularizer"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Nope"):
        regularizers.get({"class_name": "Nope", "config": {}})
    with pytest.raises(ValueError, match="Could not interpret"):
        regularizers.get(0.01)
