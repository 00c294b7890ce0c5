"""Numerical parity of cnnlab.functional convolutions with Keras 3 (JAX backend) itself."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import itertools

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnlab.functional as F
from cnnlab import backend

keras = pytest.importorskip("keras")

ATOL = 1e-4
RTOL = 1e-4


def _random_conv2d_cases(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        groups = int(rng.choice([1, 1, 2, 4]))
        in_ch = groups * int(rng.integers(1, 4))
        filters = groups * int(rng.integers(1, 4))
        kernel = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        if rng.random() < 0.5:
            strides, dilation = (int(rng.integers(1, 4)), int(rng.integers(1, 4))), (1, 1)
        else:
            strides, dilation = (1, 1), (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        size = (int(rng.integers(7, 14)), int(rng.integers(7, 14)))
        padding = str(rng.choice(["valid", "same", "SAME", "Valid"]))
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        if padding.lower() == "valid" and any(e > s for e, s in zip(eff, size)):
            continue
        cases.append(
            dict(
                groups=groups,
                in_ch=in_ch,
                filters=filters,
                kernel_size=kernel,
                strides=strides,
                dilation_rate=dilation,
                size=size,
                padding=padding,
                data_format=str(rng.choice(["channels_last", "channels_first"])),
                activation=rng.choice([None, "relu", "tanh", "gelu", "swish", "softplus"]),
                use_bias=bool(rng.random() < 0.7),
            )
        )
    return cases


CASES = _random_conv2d_cases(40)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv2d_matches_keras(case):
    rng = np.random.default_rng(hash(str(case)) % 2**32)
    layer = keras.layers.Conv2D(
        case["filters"],
        case["kernel_size"],
        strides=case["strides"],
        padding=case["padding"],
        data_format=case["data_format"],
        dilation_rate=case["dilation_rate"],
        groups=case["groups"],
        activation=case["activation"],
        use_bias=case["use_bias"],
    )
    shape = (2, *case["size"], case["in_ch"])
    if case["data_format"] == "channels_first":
        shape = (2, case["in_ch"], *case["size"])
    x = rng.standard_normal(shape).astype(np.float32)
    layer.build(shape)
    weights = [rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    expected = np.asarray(layer(x))
    got = F.conv2d(
        jnp.asarray(x),
        jnp.asarray(weights[0]),
        jnp.asarray(weights[1]) if case["use_bias"] else None,
        strides=case["strides"],
        padding=case["padding"],
        data_format=case["data_format"],
        dilation_rate=case["dilation_rate"],
        groups=case["groups"],
        activation=case["activation"],
    )
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "rank,padding,strides,dilation",
    [(1, "causal", 1, 2), (1, "same", 2, 1), (1, "valid", 1, 3), (3, "same", 2, 1), (3, "valid", 1, 2)],
)
def test_conv1d_conv3d_match_keras(rank, padding, strides, dilation):
    rng = np.random.default_rng(rank)
    cls = {1: keras.layers.Conv1D, 3: keras.layers.Conv3D}[rank]
    layer = cls(4, 3, strides=strides, padding=padding, dilation_rate=dilation)
    shape = (2, *([9] * rank), 3)
    layer.build(shape)
    weights = [rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    x = rng.standard_normal(shape).astype(np.float32)
    fn = {1: F.conv1d, 3: F.conv3d}[rank]
    got = fn(
        jnp.asarray(x),
        jnp.asarray(weights[0]),
        jnp.asarray(weights[1]),
        strides=strides,
        padding=padding,
        dilation_rate=dilation,
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(layer(x)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("padding,strides,depth_multiplier", [("same", 2, 2), ("valid", 1, 1), ("same", 1, 3)])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_depthwise_and_separable_match_keras(padding, strides, depth_multiplier, data_format):
    rng = np.random.default_rng(7)
    shape = (2, 10, 11, 3) if data_format == "channels_last" else (2, 3, 10, 11)
    x = rng.standard_normal(shape).astype(np.float32)

    dw = keras.layers.DepthwiseConv2D(
        3, strides=strides, padding=padding, depth_multiplier=depth_multiplier, data_format=data_format
    )
    dw.build(shape)
    w = [rng.standard_normal(v.shape).astype(np.float32) for v in dw.get_weights()]
    dw.set_weights(w)
    got = F.depthwise_conv(
        jnp.asarray(x), jnp.asarray(w[0]), jnp.asarray(w[1]), strides=strides, padding=padding,
        data_format=data_format,
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(dw(x)), atol=ATOL, rtol=RTOL)

    sep = keras.layers.SeparableConv2D(
        5, 3, strides=strides, padding=padding, depth_multiplier=depth_multiplier,
        data_format=data_format, activation="relu",
    )
    sep.build(shape)
    w = [rng.standard_normal(v.shape).astype(np.float32) for v in sep.get_weights()]
    sep.set_weights(w)
    got = F.separable_conv(
        jnp.asarray(x), *map(jnp.asarray, w), strides=strides, padding=padding,
        data_format=data_format, activation="relu",
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(sep(x)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "padding,strides,output_padding,kernel,dilation",
    [
        ("valid", 2, None, 3, 1),
        ("same", 2, None, 3, 1),
        ("same", 2, 1, 4, 1),
        ("valid", 3, 2, 2, 1),
        ("valid", 1, None, 3, 2),
        ("same", 1, None, 5, 2),
    ],
)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv2d_transpose_matches_keras(padding, strides, output_padding, kernel, dilation, data_format):
    rng = np.random.default_rng(11)
    shape = (2, 7, 6, 3) if data_format == "channels_last" else (2, 3, 7, 6)
    x = rng.standard_normal(shape).astype(np.float32)
    layer = keras.layers.Conv2DTranspose(
        4, kernel, strides=strides, padding=padding, output_padding=output_padding,
        dilation_rate=dilation, data_format=data_format,
    )
    layer.build(shape)
    w = [rng.standard_normal(v.shape).astype(np.float32) for v in layer.get_weights()]
    layer.set_weights(w)
    got = F.conv_transpose(
        jnp.asarray(x), jnp.asarray(w[0]), jnp.asarray(w[1]), strides=strides, padding=padding,
        output_padding=output_padding, dilation_rate=dilation, data_format=data_format,
    )
    expected = np.asarray(layer(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "pool,strides,padding",
    [(2, None, "valid"), (3, 2, "same"), ((2, 3), (1, 2), "same"), (2, (2, 1), "valid"), (3, (1, 2), "same")],
)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_pooling_matches_keras(pool, strides, padding, data_format):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 8, 3) if data_format == "channels_last" else (2, 3, 9, 8)).astype(np.float32)
    for ours, theirs in [(F.max_pool, keras.layers.MaxPooling2D), (F.avg_pool, keras.layers.AveragePooling2D)]:
        expected = theirs(pool, strides, padding=padding, data_format=data_format)(x)
        got = ours(jnp.asarray(x), pool, strides, padding=padding, data_format=data_format)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
    for ours, theirs in [
        (F.global_avg_pool, keras.layers.GlobalAveragePooling2D),
        (F.global_max_pool, keras.layers.GlobalMaxPooling2D),
    ]:
        np.testing.assert_allclose(
            np.asarray(ours(jnp.asarray(x), data_format=data_format)),
            np.asarray(theirs(data_format=data_format)(x)),
            atol=1e-5,
        )


def _reduce_window_max(x, pool, strides, padding, data_format):
    """XLA's reduce-window max with Keras' window arguments: the reference the slices must equal."""
    from cnnlab.functional import pooling
    dims, strides_full, pad = pooling._window(x, pool, strides, padding, data_format)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides_full, pad)


@pytest.mark.parametrize("shape,pool,strides,padding,data_format", [
    ((4, 12, 12, 5), 3, 2, "same", "channels_last"),
    ((4, 12, 11, 5), 3, 2, "valid", "channels_last"),
    ((4, 12, 12, 5), 2, None, "valid", "channels_last"),
    ((2, 5, 9, 8), (2, 3), (1, 2), "same", "channels_first"),
    ((2, 9, 8, 3), 2, 3, "same", "channels_last"),  # strides larger than the window
    ((3, 20, 4), 5, 2, "same", "channels_last"),  # 1-D
    ((2, 6, 7, 5, 3), 3, 2, "same", "channels_last"),  # 3-D, 27 taps
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_by_slices_equals_reduce_window_with_its_gradient(shape, pool, strides, padding,
                                                                 data_format, dtype):
    # Rounded post-ReLU values: many windows have tied maxima, where the gradient must go to the
    # first maximal tap in row-major order, as XLA's select-and-scatter sends it.
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(np.round(rng.standard_normal(shape), 1), 0), dtype)
    ours = jax.jit(lambda v: F.max_pool(v, pool, strides, padding=padding, data_format=data_format))
    ref = jax.jit(lambda v: _reduce_window_max(v, pool, strides, padding, data_format))
    y = ours(x)
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref(x), np.float32))
    cot = jnp.asarray(rng.standard_normal(y.shape), dtype)
    grad = jax.jit(jax.grad(lambda v, f: jnp.vdot(f(v).astype(jnp.float32), cot.astype(jnp.float32)),
                            argnums=0), static_argnums=1)
    if dtype == jnp.float32:
        want = grad(x, ref)
    else:
        # A bfloat16 gradient is select-and-scatter's summed in float32 and rounded once (XLA's
        # own rounds to bfloat16 after each overlapping window's add).
        want = grad(x.astype(jnp.float32), ref).astype(dtype)
    got = grad(x, ours)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # Forward mode: JAX's own reduce-window JVP breaks ties in its reduction's order, not the
    # first tap's, so it is compared on distinct values (a permutation); with ties, the
    # gradient above is this JVP transposed (JAX derives it so).
    distinct = jnp.asarray(rng.permutation(x.size).reshape(shape), dtype if dtype == jnp.float32 else jnp.float32)
    tangent = jnp.asarray(rng.standard_normal(shape), distinct.dtype)
    _, ours_dot = jax.jvp(ours, (distinct,), (tangent,))
    _, ref_dot = jax.jvp(ref, (distinct,), (tangent,))
    np.testing.assert_array_equal(np.asarray(ours_dot), np.asarray(ref_dot))


def test_max_pool_by_slices_is_the_cpu_formulation_and_composes():
    from cnnlab.functional import pooling
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 8, 4)), jnp.float32)
    hlo = jax.jit(lambda v: jax.grad(lambda w: F.max_pool(w, 3, 2, padding="same").sum())(v)).lower(x).as_text()
    assert "reduce_window" not in hlo and "select_and_scatter" not in hlo
    # Larger windows and integers stay on reduce-window.
    assert "reduce_window" in jax.jit(lambda v: F.max_pool(v, 7, 1)).lower(x).as_text()
    xi = jnp.arange(64, dtype=jnp.int32).reshape(1, 8, 8, 1)
    assert "reduce_window" in jax.jit(lambda v: F.max_pool(v, 2)).lower(xi).as_text()
    np.testing.assert_array_equal(F.max_pool(xi, 2), xi.reshape(4, 2, 4, 2).max(axis=(1, 3)).reshape(1, 4, 4, 1))
    assert pooling._SLICE_TAPS < 49
    with pooling.reduce_window_max_pooling():  # what the ONNX export traces (one MaxPool)
        assert "reduce_window" in jax.jit(lambda v: F.max_pool(v, 3, 2)).lower(x).as_text()
    assert "reduce_window" not in jax.jit(lambda v: F.max_pool(v, 3, 2)).lower(x).as_text()
    # vmap and second order go through the custom JVP.
    batched = jax.vmap(lambda v: F.max_pool(v, 3, 2, padding="same"))(x[:, None])
    np.testing.assert_array_equal(batched[:, 0], F.max_pool(x, 3, 2, padding="same"))
    hess_vec = jax.grad(lambda v: jnp.sum(jax.grad(lambda w: jnp.sum(F.max_pool(w, 2) ** 2))(v) ** 2))(x)
    ref_hv = jax.grad(lambda v: jnp.sum(jax.grad(lambda w: jnp.sum(_reduce_window_max(w, 2, None, "valid", None) ** 2))(v) ** 2))(x)
    np.testing.assert_allclose(hess_vec, ref_hv, rtol=1e-6)


@pytest.mark.parametrize("kernel,strides,dilation", [(3, 1, 1), (4, 2, 1), (3, 1, 2), (2, 3, 1)])
def test_same_padding_matches_flax_conv(kernel, strides, dilation):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 11, 10, 3)).astype(np.float32))
    module = flax_nn.Conv(4, (kernel, kernel), strides=strides, kernel_dilation=dilation, padding="SAME")
    variables = module.init(jax.random.key(0), x)
    expected = module.apply(variables, x)
    got = F.conv2d(
        x, variables["params"]["kernel"], variables["params"]["bias"], strides=strides,
        padding="same", dilation_rate=dilation,
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("symmetric", "symmetric"), ("circular", "wrap"), ("wrap", "wrap"), ("edge", "edge")])
def test_padding_modes_equal_explicit_numpy_padding(mode, np_mode):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 8, 9, 2)).astype(np.float32)
    k = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode=np_mode)
    expected = F.conv2d(jnp.asarray(padded), jnp.asarray(k), padding="valid")
    got = F.conv2d(jnp.asarray(x), jnp.asarray(k), padding="same", padding_mode=mode)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # Explicit integer padding and pairs mean the same amounts.
    got_int = F.conv2d(jnp.asarray(x), jnp.asarray(k), padding=1, padding_mode=mode)
    got_pairs = F.conv2d(jnp.asarray(x), jnp.asarray(k), padding=[(1, 1), (1, 1)], padding_mode=mode)
    np.testing.assert_allclose(np.asarray(got_int), np.asarray(expected), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_pairs), np.asarray(expected), atol=1e-5)


def test_explicit_zero_padding_equals_numpy_zero_padding():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 7, 2)).astype(np.float32)
    k = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    padded = np.pad(x, [(0, 0), (2, 0), (1, 3), (0, 0)])
    expected = F.conv2d(jnp.asarray(padded), jnp.asarray(k))
    got = F.conv2d(jnp.asarray(x), jnp.asarray(k), padding=[(2, 0), (1, 3)])
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_causal_conv1d_does_not_look_ahead():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 10, 2)).astype(np.float32)
    k = rng.standard_normal((3, 2, 2)).astype(np.float32)
    y = F.conv1d(jnp.asarray(x), jnp.asarray(k), padding="causal", dilation_rate=2)
    x2 = x.copy()
    x2[:, 6:] += 5.0  # changing the future must not change outputs up to t=5
    y2 = F.conv1d(jnp.asarray(x2), jnp.asarray(k), padding="causal", dilation_rate=2)
    assert y.shape == (1, 10, 2)
    np.testing.assert_allclose(np.asarray(y[:, :6]), np.asarray(y2[:, :6]), atol=1e-6)
    assert not np.allclose(np.asarray(y[:, 6:]), np.asarray(y2[:, 6:]))


def test_default_data_format_is_package_wide_and_changeable():
    x = jnp.ones((1, 3, 8, 8))
    k = jnp.ones((3, 3, 3, 2))
    assert backend.image_data_format() == "channels_last"
    backend.set_image_data_format("channels_first")
    try:
        assert F.conv2d(x, k).shape == (1, 2, 6, 6)
    finally:
        backend.set_image_data_format("channels_last")
    with pytest.raises(ValueError, match="channels_sideways"):
        backend.set_image_data_format("channels_sideways")


def test_bfloat16_compute_with_float32_params():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)).astype(np.float32))
    params = F.init_conv(jax.random.key(0), in_channels=3, filters=4, kernel_size=3)
    assert params["kernel"].dtype == jnp.float32
    y = F.conv2d(x, params["kernel"], params["bias"], padding="same", dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    y32 = F.conv2d(x, params["kernel"], params["bias"], padding="same")
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.1, rtol=0.05)


def test_init_conv_shapes_and_use_bias():
    p = F.init_conv(jax.random.key(1), in_channels=6, filters=8, kernel_size=(3, 5), groups=2,
                    kernel_initializer="he_normal")
    assert p["kernel"].shape == (3, 5, 3, 8) and p["bias"].shape == (8,)
    assert not np.any(np.asarray(p["bias"]))
    p = F.init_conv(jax.random.key(1), in_channels=6, filters=8, kernel_size=3, use_bias=False)
    assert set(p) == {"kernel"}


def test_grad_matches_finite_differences():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 2, 2)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((2,)).astype(np.float32))

    def loss(k, b):
        y = F.conv2d(x, k, b, strides=2, padding="same", activation="tanh")
        return jnp.sum(y**2)

    gk, gb = jax.grad(loss, argnums=(0, 1))(k, b)
    eps = 1e-2
    for idx in [(0, 0, 0, 0), (1, 2, 1, 1), (2, 1, 0, 1)]:
        e = jnp.zeros_like(k).at[idx].set(eps)
        fd = (loss(k + e, b) - loss(k - e, b)) / (2 * eps)
        np.testing.assert_allclose(float(gk[idx]), float(fd), rtol=2e-2, atol=2e-3)
    e = jnp.zeros_like(b).at[1].set(eps)
    fd = (loss(k, b + e) - loss(k, b - e)) / (2 * eps)
    np.testing.assert_allclose(float(gb[1]), float(fd), rtol=2e-2, atol=2e-3)


def test_jit_and_vmap():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 3)).astype(np.float32))
    ks = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)).astype(np.float32))
    jitted = jax.jit(lambda x, k: F.conv2d(x, k, strides=2, padding="same", activation="relu"))
    vmapped = jax.vmap(jitted)(xs, ks)
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(vmapped[i]),
            np.asarray(F.conv2d(xs[i], ks[i], strides=2, padding="same", activation="relu")),
            atol=1e-5,
        )


BAD_ARGS = [
    (dict(strides=0), "strides"),
    (dict(dilation_rate=4), "zero or negative"),
    (dict(padding_mode="reflect", dilation_rate=(1, 4)), "zero or negative"),
    (dict(padding="full"), "padding"),
    (dict(padding=-1), "padding"),
    (dict(padding="causal"), "causal"),
    (dict(data_format="NHWC"), "data_format"),
    (dict(groups=0), "groups"),
    (dict(groups=4), "groups"),
    (dict(activation="not_an_activation"), "not_an_activation"),
    (dict(padding_mode="mirror"), "padding_mode"),
    (dict(dilation_rate=(1, 1, 1)), "dilation_rate"),
]


@pytest.mark.parametrize("kwargs,needle", BAD_ARGS, ids=[n for _, n in BAD_ARGS])
def test_bad_arguments_raise_value_error_naming_them(kwargs, needle):
    x = jnp.ones((1, 8, 8, 6))
    k = jnp.ones((3, 3, 6, 4))
    with pytest.raises(ValueError, match=needle):
        F.conv2d(x, k, **kwargs)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_strides_with_dilation_match_keras_ops(padding):
    # keras.ops.conv (unlike keras.layers.Conv2D) accepts strides > 1 with dilation_rate > 1;
    # the depthwise and separable layers rely on it.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 13, 12, 4)).astype(np.float32)
    k = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    kwargs = dict(strides=(2, 3), padding=padding, dilation_rate=(2, 2))
    np.testing.assert_allclose(
        np.asarray(F.conv2d(jnp.asarray(x), jnp.asarray(k), **kwargs)),
        np.asarray(keras.ops.conv(x, k, **kwargs)),
        atol=ATOL,
        rtol=RTOL,
    )


def test_windows_larger_than_the_input_raise_as_keras_does():
    x = np.ones((2, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="empty output"):
        keras.ops.conv(x, np.ones((32, 32, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"zero or negative.*\(2, 16, 16, 3\).*\(-15, -15\)"):
        F.conv2d(jnp.asarray(x), jnp.ones((32, 32, 3, 8)))
    assert F.conv2d(jnp.asarray(x), jnp.ones((16, 16, 3, 8))).shape == (2, 1, 1, 8)
    assert F.conv2d(jnp.asarray(x), jnp.ones((32, 32, 3, 8)), padding="same").shape == (2, 16, 16, 8)
    with pytest.raises(ValueError, match="zero or negative"):
        keras.layers.MaxPooling2D(17)(keras.Input((16, 16, 3)))
    for pool in (F.max_pool, F.avg_pool):
        with pytest.raises(ValueError, match=r"zero or negative.*pool_size=\(17, 17\)"):
            pool(jnp.asarray(x), 17)
        assert pool(jnp.asarray(x), 17, padding="same").shape == (2, 1, 1, 3)


def test_kernel_input_channel_mismatch_is_clear():
    with pytest.raises(ValueError, match="input channels"):
        F.conv2d(jnp.ones((1, 8, 8, 5)), jnp.ones((3, 3, 2, 4)), groups=2)
    with pytest.raises(ValueError, match="filters"):
        F.init_conv(jax.random.key(0), in_channels=4, filters=0, kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size"):
        F.init_conv(jax.random.key(0), in_channels=4, filters=4, kernel_size=(3, 0))


def test_every_padding_string_is_case_insensitive():
    x = jnp.ones((1, 7, 7, 1))
    k = jnp.ones((3, 3, 1, 1))
    for a, b in itertools.combinations(["same", "SAME", "Same"], 2):
        np.testing.assert_array_equal(F.conv2d(x, k, padding=a), F.conv2d(x, k, padding=b))


def _lax_conv_transpose(x, k, strides, padding, output_padding, dilation, data_format):
    """The reference: Keras' own JAX formulation (lax.conv_transpose with lhs_dilation)."""
    from keras.src.backend.jax.nn import conv_transpose

    return conv_transpose(x, k, strides, padding, output_padding, data_format, dilation)


@pytest.mark.parametrize(
    "padding,strides,output_padding,kernel,dilation",
    [("valid", 2, None, 3, 1), ("same", 2, 1, 4, 1), ("valid", 3, 2, (2, 3), 1), ("same", 1, None, 3, 2),
     ("same", (2, 1), None, (3, 2), 1)],
)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_conv_transpose_gradients_equal_lax_conv_transposes(padding, strides, output_padding, kernel,
                                                           dilation, data_format):
    rng = np.random.default_rng(5)
    shape = (2, 5, 6, 3) if data_format == "channels_last" else (2, 3, 5, 6)
    ks = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal((*ks, 4, 3)), jnp.float32)
    args = dict(strides=strides, padding=padding, output_padding=output_padding, dilation_rate=dilation,
                data_format=data_format)

    def ours(x, k):
        return jnp.sum(jnp.sin(F.conv_transpose(x, k, **args)))

    def reference(x, k):
        return jnp.sum(jnp.sin(_lax_conv_transpose(x, k, strides, padding, output_padding, dilation, data_format)))

    got, want = jax.grad(ours, (0, 1))(x, k), jax.grad(reference, (0, 1))(x, k)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


_TRANSPOSE_SWEEP = """
import itertools, jax, jax.numpy as jnp
from cnnlab import functional as F
n = 0
for h, w, kh, kw, s, pad, fmt in itertools.product((1, 2, 3), (1, 2, 5), (1, 2, 3), (2, 3), (1, 2, 3),
                                                   ("same", "valid"), ("channels_last", "channels_first")):
    x = jnp.ones((1, h, w, 2) if fmt == "channels_last" else (1, 2, h, w))
    loss = lambda x, k: jnp.sum(F.conv_transpose(x, k, strides=s, padding=pad, data_format=fmt) ** 2)
    jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1)))(x, jnp.ones((kh, kw, 3, 2))))
    n += 1
print(n)
"""


@pytest.mark.slow
def test_transposed_convolutions_of_tiny_inputs_never_crash_the_process():
    # A 2-pixel-high input with kernel (3, 2), strides 2, 'same' aborted some jaxlib builds in
    # XLA's algebraic simplifier (Keras' lhs_dilation form); a subprocess turns an abort into a failure.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRANSPOSE_SWEEP], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(3 * 3 * 3 * 2 * 3 * 2 * 2)
