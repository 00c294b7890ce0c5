"""cnnlab.constraints against Keras 3 (JAX backend): projections, configs and `get`."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnnlab import constraints  # noqa: E402

keras = pytest.importorskip("keras")
from keras.src.constraints import ALL_OBJECTS_DICT as KERAS_CONSTRAINTS  # noqa: E402

CLASSES = [
    ("MaxNorm", {}),
    ("MaxNorm", {"max_value": 1.2}),
    ("MinMaxNorm", {}),
    ("MinMaxNorm", {"min_value": 0.8, "max_value": 1.5, "rate": 0.5}),
    ("UnitNorm", {}),
    ("NonNeg", {}),
]
# (shape, axis): Dense kernels and conv kernels, per-unit and per-filter norms.
LAYOUTS = [
    ((6, 4), 0),
    ((6, 4), 1),
    ((6, 4), [0, 1]),
    ((3, 3, 2, 4), 0),
    ((3, 3, 2, 4), [0, 1, 2]),
    ((3, 3, 2, 4), -1),
]
CASES = [
    (name, kwargs if name == "NonNeg" else {**kwargs, "axis": axis}, shape)
    for name, kwargs in CLASSES
    for shape, axis in LAYOUTS
]


def _id(case):
    name, kwargs, shape = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items()) + f"-{shape}"


def _weights(shape):
    """Random weights whose slice norms straddle the bounds, with one all-zero slice."""
    rng = np.random.default_rng(sum(shape))
    w = (rng.normal(size=shape) * rng.uniform(0.1, 1.0, size=shape[-1])).astype(np.float32)
    w[..., 0] = 0.0
    return jnp.asarray(w)


# Cheaper XLA:CPU code generation for the one-shot batch below.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _evaluate(module):
    """Every CASE's projection in one jitted computation (one compilation per library)."""
    inputs = {shape: _weights(shape) for shape, _ in LAYOUTS}

    def run(inputs):
        return {_id(c): getattr(module, c[0])(**c[1])(inputs[c[2]]) for c in CASES}

    return jax.jit(run).lower(inputs).compile(_FAST_COMPILE)(inputs)


@pytest.fixture(scope="module")
def ours():
    return _evaluate(constraints)


@pytest.fixture(scope="module")
def theirs():
    return _evaluate(keras.constraints)


@pytest.mark.parametrize("case_id", [_id(c) for c in CASES])
def test_projection_equals_keras(case_id, ours, theirs):
    got, expected = ours[case_id], theirs[case_id]
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_eager_call_equals_keras():
    w = _weights((6, 4))
    got = constraints.MaxNorm(1.0)(w)
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(got, keras.constraints.MaxNorm(1.0)(w), rtol=1e-6)
    np.testing.assert_allclose(constraints.NonNeg()(np.asarray(w)), np.maximum(w, 0))


def test_projections_do_what_they_say():
    w = _weights((3, 3, 2, 4))
    axes = (0, 1, 2)

    def norms(v):
        return np.sqrt(np.sum(np.square(np.asarray(v, np.float64)), axis=axes))

    assert np.all(norms(constraints.MaxNorm(0.5, axis=axes)(w)) <= 0.5 + 1e-6)
    unit = norms(constraints.UnitNorm(axis=axes)(w))
    np.testing.assert_allclose(unit[1:], 1.0, rtol=1e-5)
    assert unit[0] == 0.0  # the epsilon keeps an all-zero filter at zero instead of NaN
    mm = norms(constraints.MinMaxNorm(0.9, 1.1, axis=axes)(w))
    assert np.all((mm[1:] >= 0.9 - 1e-5) & (mm[1:] <= 1.1 + 1e-5))
    assert np.all(np.asarray(constraints.NonNeg()(w)) >= 0)
    assert constraints.Constraint()(w) is w


# --- configs and get ---------------------------------------------------------------------------


def test_names_match_keras():
    assert set(constraints.names()) == set(KERAS_CONSTRAINTS) - {"Constraint", "constraint"}


@pytest.mark.parametrize("case", CLASSES, ids=[n + str(k) for n, k in CLASSES])
def test_get_config_matches_keras_and_round_trips(case):
    name, kwargs = case
    ours = getattr(constraints, name)(**kwargs)
    theirs = getattr(keras.constraints, name)(**kwargs)
    assert ours.get_config() == theirs.get_config()
    clone = type(ours).from_config(ours.get_config())
    assert type(clone) is type(ours) and clone.get_config() == ours.get_config()
    loaded = constraints.get(keras.constraints.serialize(theirs))
    assert type(loaded) is type(ours) and loaded.get_config() == ours.get_config()
    assert constraints.get(constraints.serialize(ours)).get_config() == ours.get_config()


@pytest.mark.parametrize(
    "identifier, cls",
    [
        ("max_norm", "MaxNorm"),
        ("MaxNorm", "MaxNorm"),
        ("min_max_norm", "MinMaxNorm"),
        ("MinMaxNorm", "MinMaxNorm"),
        ("non_neg", "NonNeg"),
        ("NonNeg", "NonNeg"),
        ("unit_norm", "UnitNorm"),
        ("UnitNorm", "UnitNorm"),
    ],
)
def test_get_by_name(identifier, cls):
    obj = constraints.get(identifier)
    assert type(obj) is getattr(constraints, cls)
    assert obj.get_config() == keras.constraints.get(identifier).get_config()


def test_get_other_forms():
    assert constraints.get(None) is None
    instance = constraints.MaxNorm(3, axis=[0, 1, 2])
    assert constraints.get(instance) is instance
    assert type(constraints.get(constraints.UnitNorm)) is constraints.UnitNorm

    def clip(w):
        return jnp.clip(w, -1, 1)

    assert constraints.get(clip) is clip
    c = constraints.get({"class_name": "MaxNorm", "config": {"max_value": 3, "axis": [0, 1, 2]}})
    assert isinstance(c, constraints.MaxNorm) and (c.max_value, c.axis) == (3, [0, 1, 2])
    assert constraints.max_norm is constraints.MaxNorm


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="maxnorm") as info:
        constraints.get("maxnorm")
    for name in ("max_norm", "MaxNorm", "non_neg", "unit_norm", "min_max_norm"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Clip"):
        constraints.get({"class_name": "Clip", "config": {}})
    with pytest.raises(ValueError, match="Could not interpret"):
        constraints.get(2)
