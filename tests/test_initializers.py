"""cnnlab.initializers against Keras 3 (JAX backend): values, statistics, fans, configs, `get`."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnnlab import initializers  # noqa: E402

keras = pytest.importorskip("keras")
from keras.src.initializers import ALL_OBJECTS_DICT as KERAS_INITIALIZERS  # noqa: E402
from keras.src.initializers.random_initializers import (  # noqa: E402
    compute_fans as keras_compute_fans,
)

CONV_SHAPE = (3, 3, 64, 128)  # fan_in 576, fan_out 1152

RANDOM_CLASSES = [
    ("RandomNormal", {}),
    ("RandomNormal", {"mean": 1.0, "stddev": 0.5}),
    ("TruncatedNormal", {}),
    ("TruncatedNormal", {"mean": -0.5, "stddev": 2.0}),
    ("RandomUniform", {}),
    ("RandomUniform", {"minval": -3.0, "maxval": 1.0}),
    ("GlorotUniform", {}),
    ("GlorotNormal", {}),
    ("HeNormal", {}),
    ("HeUniform", {}),
    ("LecunNormal", {}),
    ("LecunUniform", {}),
    ("Orthogonal", {}),
    ("Orthogonal", {"gain": 2.0}),
] + [
    ("VarianceScaling", {"scale": 0.7, "mode": mode, "distribution": dist})
    for mode, dist in [
        ("fan_in", "truncated_normal"),
        ("fan_out", "untruncated_normal"),
        ("fan_avg", "uniform"),
        ("fan_out", "normal"),
        ("fan_in", "uniform"),
        ("fan_avg", "truncated_normal"),
    ]
]


def _id(case):
    name, kwargs = case
    return name + "".join(f"-{v}" for v in kwargs.values())


def test_names_match_keras():
    keras_names = set(KERAS_INITIALIZERS) - {"Initializer", "initializer"}
    assert set(initializers.names()) == keras_names


# --- values ------------------------------------------------------------------------------------

PARITY_SHAPES = [(3, 3, 4, 8), (40, 7), (4, 10)]
PRESETS = [
    ("GlorotUniform", 1.0, "fan_avg", "uniform"),
    ("GlorotNormal", 1.0, "fan_avg", "normal"),
    ("HeNormal", 2.0, "fan_in", "normal"),
    ("HeUniform", 2.0, "fan_in", "uniform"),
    ("LecunNormal", 1.0, "fan_in", "normal"),
    ("LecunUniform", 1.0, "fan_in", "uniform"),
]
STAT_CASES = [(name, {}) for name, *_ in PRESETS] + [
    ("VarianceScaling", {"scale": 2.0, "distribution": "untruncated_normal"}),
    ("RandomNormal", {"mean": 0.3, "stddev": 0.2}),
    ("RandomUniform", {"minval": -1.0, "maxval": 3.0}),
    ("TruncatedNormal", {"stddev": 1.0}),
]
STAT_SEEDS = (0, 123)
AXES_KWARGS = {"distribution": "uniform", "input_axes": [0, 2], "output_axes": [1, 3]}
# Cheaper XLA:CPU code generation: the draws below compile in about half the time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _parity_shapes(name):
    # The wide shape only matters for Orthogonal (orthonormal rows); fewer draws compile faster.
    return PARITY_SHAPES if name == "Orthogonal" else PARITY_SHAPES[:2]


def _draw_all(make):
    """All random draws of this file for one library, in a single jitted computation (one
    compilation per library keeps the file fast). ``make(name, kwargs, seed)`` returns a
    function ``shape -> Array``."""
    parity_cases = [(c, s) for c in RANDOM_CLASSES for s in _parity_shapes(c[0])]
    parity_ids = [(_id(c), s) for c, s in parity_cases]
    stats_ids = [(_id(c), seed) for c in STAT_CASES for seed in STAT_SEEDS]

    def run():
        parity = [make(n, kw, 11)(s) for (n, kw), s in parity_cases]
        stats = [make(n, kw, seed)(CONV_SHAPE) for n, kw in STAT_CASES for seed in STAT_SEEDS]
        axes = make("VarianceScaling", AXES_KWARGS, 3)(PARITY_SHAPES[0])
        return parity, stats, axes

    parity, stats, axes = jax.jit(run).lower().compile(_FAST_COMPILE)()
    return {
        **dict(zip(parity_ids, map(np.asarray, parity), strict=True)),
        **dict(zip(stats_ids, map(np.asarray, stats), strict=True)),
        "axes": np.asarray(axes),
    }


@pytest.fixture(scope="module")
def ours():
    def make(name, kwargs, seed):
        init = getattr(initializers, name)(**kwargs)
        return lambda shape: init(initializers.keras_key(seed), shape)

    return _draw_all(make)


@pytest.fixture(scope="module")
def theirs():
    return _draw_all(
        lambda name, kwargs, seed: getattr(keras.initializers, name)(seed=seed, **kwargs)
    )


PARITY_CASES = [(c, s) for c in RANDOM_CLASSES for s in _parity_shapes(c[0])]


@pytest.mark.parametrize(
    "case, shape", PARITY_CASES, ids=[f"{_id(c)}-{s}" for c, s in PARITY_CASES]
)
def test_random_values_equal_keras_for_the_same_seed(case, shape, ours, theirs):
    """keras_key(seed) is the key Keras' JAX backend uses, so the draws are identical."""
    got, expected = ours[_id(case), shape], theirs[_id(case), shape]
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_same_key_same_values(theirs):
    """The key alone determines the draw (the `seed` argument plays no part)."""
    shape = PARITY_SHAPES[0]

    def run():
        key = initializers.keras_key(11)
        typed = jax.random.key(5)
        return (
            initializers.GlorotUniform()(key, shape),
            initializers.GlorotUniform(seed=99)(key, shape),
            initializers.GlorotUniform()(initializers.keras_key(12), shape),
            initializers.GlorotUniform()(typed, shape),
            initializers.GlorotUniform(seed=1)(typed, shape),
        )

    a, same_key, other_key, typed, typed_again = map(
        np.asarray, jax.jit(run).lower().compile(_FAST_COMPILE)()
    )
    np.testing.assert_allclose(a, theirs["GlorotUniform", shape], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a, same_key)
    assert not np.array_equal(a, other_key)
    np.testing.assert_array_equal(typed, typed_again)  # new-style typed keys work too


def test_random_initializers_require_a_key():
    with pytest.raises(ValueError, match="PRNG key"):
        initializers.HeNormal()(None, (3, 3))


def test_eager_call_returns_jax_array():
    out = initializers.Constant(0.5)(None, (2, 3))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32 and out.shape == (2, 3)


def _expected_std(fan_in, fan_out, scale, mode):
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    return np.sqrt(scale / n)


@pytest.mark.parametrize("name, scale, mode, dist", PRESETS)
def test_variance_scaling_statistics(name, scale, mode, dist, ours, theirs):
    """Mean, std and bounds over a (3, 3, 64, 128) kernel match theory and Keras."""
    std = _expected_std(576, 1152, scale, mode)
    samples = [lib[name, seed] for lib in (ours, theirs) for seed in STAT_SEEDS]
    for sample in samples:
        assert sample.shape == CONV_SHAPE
        assert abs(sample.mean()) < 0.02 * std
        assert sample.std() == pytest.approx(std, rel=0.02)
        if dist == "uniform":
            limit = np.sqrt(3.0) * std
            assert limit * 0.99 < np.abs(sample).max() <= limit
        else:  # truncated at 2 stddev of the underlying (corrected) normal
            bound = 2 * std / 0.87962566103423978
            assert bound * 0.99 < np.abs(sample).max() <= bound * (1 + 1e-6)
    # Independent samples (ours with seed 0 vs Keras with seed 123) agree statistically.
    assert samples[0].std() == pytest.approx(samples[3].std(), rel=0.02)
    assert abs(samples[0].mean() - samples[3].mean()) < 0.02 * std


def test_other_distributions_statistics(ours, theirs):
    for lib in (ours, theirs):
        untruncated = lib["VarianceScaling-2.0-untruncated_normal", 0]
        assert untruncated.std() == pytest.approx(np.sqrt(2.0 / 576), rel=0.02)
        assert np.abs(untruncated).max() > 3 * np.sqrt(2.0 / 576)  # not truncated
        normal = lib["RandomNormal-0.3-0.2", 0]
        assert normal.mean() == pytest.approx(0.3, abs=0.005)
        assert normal.std() == pytest.approx(0.2, rel=0.02)
        uniform = lib["RandomUniform--1.0-3.0", 123]
        assert uniform.min() >= -1.0 and uniform.max() < 3.0
        assert uniform.mean() == pytest.approx(1.0, abs=0.02)
        trunc = lib["TruncatedNormal-1.0", 0]
        assert np.abs(trunc).max() <= 2.0
        assert trunc.std() == pytest.approx(0.87962566103423978, rel=0.02)


def test_dtypes():
    dtypes = [jnp.float16, jnp.bfloat16, "float32", None]
    inits = [initializers.GlorotUniform(), initializers.Zeros(), initializers.Orthogonal()]

    def run(key):
        return [[init(key, (5, 3), dtype) for init in inits] for dtype in dtypes]

    key = jax.random.key(0)
    results = jax.jit(run).lower(key).compile(_FAST_COMPILE)(key)
    for dtype, outs in zip(dtypes, results, strict=True):
        expected = jnp.float32 if dtype is None else jnp.dtype(dtype)
        for out in outs:
            assert out.dtype == expected and out.shape == (5, 3)


# --- fans --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(), (7,), (5, 3), (3, 4, 6), (3, 3, 64, 128), (2, 3, 4, 5, 6), (1, 1, 1, 9, 2)],
)
def test_compute_fans_matches_keras(shape):
    assert initializers.compute_fans(shape) == keras_compute_fans(shape)


def test_compute_fans_with_axes_matches_keras(ours, theirs):
    shape = (4, 5, 6, 7)
    kw = {"input_axes": [0, 2], "output_axes": [1, 3]}
    assert initializers.compute_fans(shape, **kw) == keras_compute_fans(shape, **kw)
    assert initializers.compute_fans(shape, **kw) == (24, 35)
    np.testing.assert_allclose(ours["axes"], theirs["axes"], rtol=1e-6)


# --- orthogonal, identity, constants -----------------------------------------------------------


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=["conv", "dense", "wide"])
def test_orthogonal_is_orthonormal(shape, ours):
    q = ours["Orthogonal", shape].astype(np.float64)
    m = q.reshape(-1, shape[-1])
    if m.shape[0] >= m.shape[1]:
        np.testing.assert_allclose(m.T @ m, np.eye(m.shape[1]), atol=1e-5)
    else:
        np.testing.assert_allclose(m @ m.T, np.eye(m.shape[0]), atol=1e-5)
    np.testing.assert_allclose(ours["Orthogonal-2.0", shape], 2.0 * q, rtol=1e-6, atol=1e-6)


def test_orthogonal_rejects_rank_1():
    with pytest.raises(ValueError, match="two-dimensional"):
        initializers.Orthogonal()(jax.random.key(0), (5,))


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (6, 2)])
def test_identity_equals_keras(shape):
    for gain in (1.0, 0.5):
        expected = np.asarray(keras.initializers.Identity(gain=gain)(shape))
        got = initializers.Identity(gain=gain)(None, shape)
        np.testing.assert_array_equal(np.asarray(got), expected)
    with pytest.raises(ValueError, match="2D"):
        initializers.Identity()(None, (2, 2, 2))


def test_constants_exact():
    shape = (2, 3, 4)
    np.testing.assert_array_equal(initializers.Zeros()(None, shape), np.zeros(shape))
    np.testing.assert_array_equal(initializers.Ones()(None, shape), np.ones(shape))
    np.testing.assert_array_equal(initializers.Constant(0.25)(None, shape), np.full(shape, 0.25))
    np.testing.assert_array_equal(
        initializers.Constant(0.1)(None, shape),
        np.asarray(keras.initializers.Constant(0.1)(shape)),
    )
    row = initializers.Constant(jnp.arange(4.0))(None, shape)
    np.testing.assert_array_equal(row, np.broadcast_to(np.arange(4.0), shape))
    assert initializers.Constant(3)(None, (2,), jnp.int32).dtype == jnp.int32


# --- STFT --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "side, window, scaling, periodic",
    [
        ("real", "hann", "density", False),
        ("imag", "hann", "density", True),
        ("real", "hamming", "spectrum", False),
        ("imag", "blackman", None, True),
        ("real", "bartlett", "density", True),
        ("imag", "boxcar", "spectrum", False),
        ("real", None, "density", False),
        ("imag", "array", "spectrum", False),
    ],
)
def test_stft_equals_keras(side, window, scaling, periodic):
    if window == "array":
        window = list(np.linspace(0.1, 1.0, 16))
    shape = (16, 1, 9)
    kwargs = {"side": side, "window": window, "scaling": scaling, "periodic": periodic}
    expected = np.asarray(keras.initializers.STFT(**kwargs)(shape))
    got = initializers.STFT(**kwargs)(None, shape)
    assert got.shape == shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", ["hann", "hamming", "blackman", "bartlett", "boxcar"])
@pytest.mark.parametrize("length", [1, 2, 7, 16])  # numpy only: fast
@pytest.mark.parametrize("periodic", [False, True])
def test_stft_windows_equal_scipy(window, length, periodic):
    signal = pytest.importorskip("scipy.signal")
    np.testing.assert_allclose(
        initializers._get_window(window, length, periodic),
        signal.get_window(window, length, fftbins=periodic),
        atol=1e-12,
    )


def test_stft_validation():
    with pytest.raises(ValueError, match="side"):
        initializers.STFT(side="both")
    with pytest.raises(ValueError, match="kaiser_bessel_derived"):
        initializers.STFT(window="kaiser_bessel_derived")
    with pytest.raises(ValueError, match="Scaling"):
        initializers.STFT(scaling="l3")


# --- configs and get ---------------------------------------------------------------------------

CONFIG_CASES = [
    ("Constant", {"value": 0.5}),
    ("Zeros", {}),
    ("Ones", {}),
    ("Identity", {"gain": 2.0}),
    ("STFT", {"side": "imag", "window": "hamming", "scaling": "spectrum", "periodic": True}),
    ("RandomNormal", {"mean": 0.1, "stddev": 0.3, "seed": 4}),
    ("TruncatedNormal", {"mean": 0.1, "stddev": 0.3, "seed": None}),
    ("RandomUniform", {"minval": -1.0, "maxval": 2.0, "seed": 7}),
    ("VarianceScaling", {"scale": 3.0, "mode": "fan_out", "distribution": "uniform", "seed": 1}),
    ("GlorotUniform", {"seed": 3}),
    ("GlorotNormal", {}),
    ("HeNormal", {"seed": 9}),
    ("HeUniform", {}),
    ("LecunNormal", {}),
    ("LecunUniform", {"seed": 2}),
    ("Orthogonal", {"gain": 0.5, "seed": 8}),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_get_config_matches_keras_and_round_trips(case):
    name, kwargs = case
    ours = getattr(initializers, name)(**kwargs)
    theirs = getattr(keras.initializers, name)(**kwargs)
    if name == "Identity":
        # Keras' Identity has no get_config (its config is {}, so `gain` is lost on reload);
        # cnnlab keeps `gain`.
        assert ours.get_config() == {"gain": 2.0} and theirs.get_config() == {}
        theirs = keras.initializers.Identity()
        ours = initializers.Identity(gain=1.0)
        assert initializers.get(keras.initializers.serialize(theirs)).gain == 1.0
        return
    assert ours.get_config() == theirs.get_config()
    clone = type(ours).from_config(ours.get_config())
    assert type(clone) is type(ours) and clone.get_config() == ours.get_config()
    assert ours.clone().get_config() == ours.get_config()
    # Keras' full serialization (module, registered_name...) loads through get().
    loaded = initializers.get(keras.initializers.serialize(theirs))
    assert type(loaded) is type(ours) and loaded.get_config() == ours.get_config()
    assert initializers.get(initializers.serialize(ours)).get_config() == ours.get_config()


@pytest.mark.parametrize(
    "identifier, cls",
    [
        ("he_normal", "HeNormal"),
        ("HeNormal", "HeNormal"),
        ("glorot_uniform", "GlorotUniform"),
        ("GlorotUniform", "GlorotUniform"),
        ("zeros", "Zeros"),
        ("zero", "Zeros"),
        ("ones", "Ones"),
        ("one", "Ones"),
        ("orthogonal", "Orthogonal"),
        ("OrthogonalInitializer", "Orthogonal"),
        ("identity", "Identity"),
        ("IdentityInitializer", "Identity"),
        ("normal", "RandomNormal"),
        ("uniform", "RandomUniform"),
        ("variance_scaling", "VarianceScaling"),
        ("stft", "STFT"),
    ],
)
def test_get_by_name(identifier, cls):
    obj = initializers.get(identifier)
    assert type(obj) is getattr(initializers, cls)
    assert type(keras.initializers.get(identifier)).__name__ == cls


def test_get_other_forms():
    assert initializers.get(None) is None
    instance = initializers.HeUniform()
    assert initializers.get(instance) is instance
    assert type(initializers.get(initializers.LecunNormal)) is initializers.LecunNormal

    def plain(key, shape, dtype=jnp.float32):
        return jnp.full(shape, 7, dtype)

    assert initializers.get(plain) is plain
    vs = initializers.get(
        {"class_name": "VarianceScaling", "config": {"scale": 2.0, "mode": "fan_out"}}
    )
    assert isinstance(vs, initializers.VarianceScaling)
    assert (vs.scale, vs.mode, vs.distribution) == (2.0, "fan_out", "truncated_normal")
    assert type(initializers.get({"class_name": "zeros"})) is initializers.Zeros
    assert initializers.he_normal is initializers.HeNormal


def test_get_array_identifier():
    value = np.arange(6.0).reshape(2, 3)
    init = initializers.get(value)
    np.testing.assert_array_equal(init(None, (2, 3)), value)
    assert init(None, (2, 3), jnp.float16).dtype == jnp.float16
    with pytest.raises(ValueError, match="shape"):
        init(None, (3, 2))


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="he_norml") as info:
        initializers.get("he_norml")
    for name in ("he_normal", "HeNormal", "glorot_uniform", "zeros", "Orthogonal"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Bogus"):
        initializers.get({"class_name": "Bogus", "config": {}})
    with pytest.raises(ValueError, match="Could not interpret"):
        initializers.get(1.5)


def test_constructor_validation_matches_keras():
    for kwargs in ({"scale": 0.0}, {"mode": "fan_max"}, {"distribution": "cauchy"}):
        with pytest.raises(ValueError):
            keras.initializers.VarianceScaling(**kwargs)
        with pytest.raises(ValueError):
            initializers.VarianceScaling(**kwargs)
    assert initializers.VarianceScaling(distribution="Normal").distribution == "truncated_normal"
