"""cnnlab.functional's dropout mask and training-mode batch normalization against the plain
JAX computations they replace: the same bits, the same forward values, autodiff's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnlab.functional as F


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1, 5), (32, 23, 23, 32), (4, 0, 3)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.75, 1.0])
def test_bernoulli_is_jax_random_bernoulli_bit_for_bit(shape, p):
    for key in (jax.random.key(0), jax.random.key(12345), jax.random.PRNGKey(7)):
        want = jax.random.bernoulli(key, p, shape)
        got = jax.jit(F.bernoulli, static_argnums=2)(key, p, shape)
        assert got.shape == shape and got.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bernoulli_under_vmap_with_per_trial_keys_and_probabilities():
    keys = jax.random.split(jax.random.key(3), 4)
    ps = jnp.array([0.9, 0.5, 0.25, 0.0])
    want = jax.vmap(lambda k, p: jax.random.bernoulli(k, p, (10, 33)))(keys, ps)
    got = jax.jit(jax.vmap(lambda k, p: F.bernoulli(k, p, (10, 33))))(keys, ps)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bernoulli_falls_back_to_jax_random_for_other_generators():
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(np.asarray(F.bernoulli(key, 0.3, (5, 6))),
                                  np.asarray(jax.random.bernoulli(key, 0.3, (5, 6))))


def test_bernoulli_with_a_float64_or_bfloat16_probability_is_still_jax_random_bernoulli():
    key = jax.random.key(5)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(np.asarray(F.bernoulli(key, 0.3, (64,))),
                                      np.asarray(jax.random.bernoulli(key, 0.3, (64,))))
    p = jnp.bfloat16(0.3)
    np.testing.assert_array_equal(np.asarray(F.bernoulli(key, p, (64,))),
                                  np.asarray(jax.random.bernoulli(key, p, (64,))))


def test_dropout_mask_is_the_one_jax_random_bernoulli_draws():
    key = jax.random.key(11)
    x = jax.random.normal(jax.random.key(1), (8, 5, 5, 16))
    keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
    got = np.asarray(F.dropout(key, x, 0.25))
    np.testing.assert_array_equal(got != 0, keep)
    np.testing.assert_allclose(got, np.where(keep, np.asarray(x) / np.float32(0.75), 0.0), rtol=1e-6)


def _reference(x, gamma, beta, epsilon, axis):
    axes = [a for a in range(x.ndim) if a != axis % x.ndim]
    mean, variance = F.moments(x, axes)
    return F.batch_norm(x, mean, variance, axis=axis, gamma=gamma, beta=beta, epsilon=epsilon), mean, variance


def _loss(fn, weights):
    w, wm, wv = weights

    def loss(x, gamma, beta, epsilon):
        y, mean, variance = fn(x, gamma, beta, epsilon)
        return jnp.sum(jnp.sin(y) * w) + jnp.sum(mean * wm) + jnp.sum(variance * wv)

    return loss


CASES = [(-1, True, True), (-1, False, True), (-1, True, False), (-1, False, False), (1, True, True), (0, True, True)]


@pytest.mark.parametrize("axis,scale,center", CASES)
def test_batch_norm_training_forward_is_moments_then_batch_norm_exactly(axis, scale, center):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5, 6, 3)).astype(np.float32) * 3 + 1.5)
    c = x.shape[axis]
    gamma = jnp.asarray(rng.normal(size=(c,)), jnp.float32) if scale else None
    beta = jnp.asarray(rng.normal(size=(c,)), jnp.float32) if center else None
    got = jax.jit(lambda x, g, b: F.batch_norm_training(x, axis=axis, gamma=g, beta=b, epsilon=1e-3))(x, gamma, beta)
    want = jax.jit(lambda x, g, b: _reference(x, g, b, 1e-3, axis))(x, gamma, beta)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("axis,scale,center", CASES)
def test_batch_norm_training_gradients_equal_autodiff(axis, scale, center, dtype, rtol):
    # The closed-form VJP against autodiff through moments + batch_norm, cotangents of the
    # returned mean and variance included; float64 shows the formula is exact.
    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(1)
        x = jnp.asarray((rng.normal(size=(4, 5, 6, 3)) * 3 + 1.5).astype(dtype))
        c = x.shape[axis]
        gamma = jnp.asarray(rng.normal(size=(c,)).astype(dtype)) if scale else None
        beta = jnp.asarray(rng.normal(size=(c,)).astype(dtype)) if center else None
        weights = tuple(jnp.asarray(rng.normal(size=s).astype(dtype)) for s in (x.shape, (c,), (c,)))
        new = _loss(lambda x, g, b, e: F.batch_norm_training(x, axis=axis, gamma=g, beta=b, epsilon=e), weights)
        old = _loss(lambda x, g, b, e: _reference(x, g, b, e, axis), weights)
        eps = jnp.asarray(1e-3, dtype)
        got = jax.jit(jax.grad(new, argnums=(0, 1, 2, 3)))(x, gamma, beta, eps)
        want = jax.jit(jax.grad(old, argnums=(0, 1, 2, 3)))(x, gamma, beta, eps)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                scale_ = float(np.max(np.abs(np.asarray(b)))) or 1.0
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * scale_)


def test_batch_norm_training_under_vmap_and_second_order():
    # Packed sweep trials vmap the model; a gradient penalty differentiates the VJP again.
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.normal(size=(3, 8, 4, 4, 5)), jnp.float32)
    gammas = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    got = jax.vmap(lambda x, g: jax.grad(lambda x: jnp.sum(F.batch_norm_training(x, gamma=g)[0] ** 3))(x))(xs, gammas)
    want = jax.vmap(lambda x, g: jax.grad(lambda x: jnp.sum(_reference(x, g, None, 1e-3, -1)[0] ** 3))(x))(xs, gammas)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    x = xs[0]
    hess_got = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(F.batch_norm_training(x)[0])))(x) ** 2))(x)
    hess_want = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(_reference(x, None, None, 1e-3, -1)[0])))(x) ** 2))(x)
    np.testing.assert_allclose(np.asarray(hess_got), np.asarray(hess_want), rtol=1e-3, atol=1e-3)
