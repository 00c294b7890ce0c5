"""On-device normalization and Keras-style augmentation (cnnlab.data.transforms)."""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnlab.data as D


def _img(b=2, h=10, w=10, c=3, seed=0, dtype=np.float32):
    x = np.random.default_rng(seed).uniform(0, 255, (b, h, w, c))
    return x.astype(dtype) if dtype == np.float32 else np.rint(x).astype(dtype)


def _params(b=1, **kw):
    p = {
        "theta": 0.0,
        "tx": 0.0,
        "ty": 0.0,
        "shear": 0.0,
        "zx": 1.0,
        "zy": 1.0,
        "flip_horizontal": False,
        "flip_vertical": False,
    }
    p.update(kw)
    return {k: jnp.full((b,), v) for k, v in p.items()}


KEY = jax.random.PRNGKey(0)


# --------------------------------------------------------------------------- normalize


def test_normalize_modes():
    x = jnp.asarray(_img(dtype=np.uint8))
    s = D.normalize(x)
    assert s.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(s), np.asarray(x) / 255.0, rtol=1e-6)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    m = D.normalize(x, "mean_std", jnp.asarray(mean), jnp.asarray(std))
    np.testing.assert_allclose(
        np.asarray(m), (np.asarray(x) / 255.0 - mean) / std, rtol=1e-5, atol=1e-6
    )
    cm, cs = D.channel_mean_std(np.asarray(x))
    np.testing.assert_allclose(cm, (np.asarray(x) / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(cs, (np.asarray(x) / 255.0).std(axis=(0, 1, 2)), rtol=1e-5)
    with pytest.raises(ValueError, match="mean_std"):
        D.normalize(x, "mean_std")
    with pytest.raises(ValueError, match="unknown mode"):
        D.normalize(x, "zscore")


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_zero_config_is_exact_identity(dtype):
    x = jnp.asarray(_img(4, 12, 9, dtype=dtype))
    out = D.augment(KEY, x)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    for augment in (None, D.augment_preset("none"), {"ops": ("keras_affine",)}):
        out, labels = D.augment_pipeline(augment, 3)(KEY, x, jnp.arange(4) % 3)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(labels), np.eye(3)[np.arange(4) % 3])
    # The warp itself is exact for identity parameters, too.
    np.testing.assert_array_equal(np.asarray(D.apply_transform(x, _params(4))), np.asarray(x))


def test_horizontal_and_vertical_flip():
    x = jnp.asarray(_img(1, 6, 7))
    h = D.apply_transform(x, _params(flip_horizontal=True))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(x)[:, :, ::-1])
    v = D.apply_transform(x, _params(flip_vertical=True))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(x)[:, ::-1])
    batch = jnp.asarray(_img(32, 6, 7, seed=1, dtype=np.uint8))
    out = np.asarray(D.augment(jax.random.PRNGKey(3), batch, horizontal_flip=True))
    flipped = [np.array_equal(o, b[:, ::-1]) for o, b in zip(out, np.asarray(batch), strict=True)]
    same = [np.array_equal(o, b) for o, b in zip(out, np.asarray(batch), strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 4 < sum(flipped) < 28


def test_rotation_by_90_degrees_is_rot90():
    x = _img(1, 9, 9)
    out = np.asarray(D.apply_transform(jnp.asarray(x), _params(theta=90.0)))
    # Keras' matrix for +90 degrees: out[r, c] = in[c, n-1-r], i.e. np.rot90 (counter-clockwise).
    np.testing.assert_allclose(out[0], np.rot90(x[0], k=1), atol=2e-3)
    out = np.asarray(D.apply_transform(jnp.asarray(x), _params(theta=-90.0)))
    np.testing.assert_allclose(out[0], np.rot90(x[0], k=-1), atol=2e-3)


def test_rotation_by_small_angle_matches_hand_computation():
    # Bilinear sample of a linear ramp is exact: in_col = cos*(c-cc) - sin*(r-cr) + cc for theta.
    h = w = 11
    ramp = np.tile(np.arange(w, dtype=np.float32), (h, 1))[None, :, :, None] * 10.0
    theta = 10.0
    out = np.asarray(D.apply_transform(jnp.asarray(ramp), _params(theta=theta), "nearest"))[
        0, :, :, 0
    ]
    t = np.deg2rad(theta)
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    cr = cc = 5.0
    in_col = -np.sin(t) * (r - cr) + np.cos(t) * (c - cc) + cc
    expected = 10.0 * np.clip(in_col, 0, w - 1)
    np.testing.assert_allclose(out, expected, atol=1e-3)


@pytest.mark.parametrize(
    "mode,expected_tail",
    [
        ("constant", lambda x: np.full_like(x[:, :, -2:], 7.0)),
        ("nearest", lambda x: np.repeat(x[:, :, -1:], 2, axis=2)),
        ("reflect", lambda x: x[:, :, [-1, -2]]),  # half-sample symmetric: d c b a | a b c d | d c
        ("wrap", lambda x: x[:, :, [1, 2]]),  # scipy's wrap: period n-1
    ],
)
def test_fill_modes_on_a_shift(mode, expected_tail):
    x = _img(1, 5, 8, seed=2)
    # Keras' tx (drawn from height_shift_range) moves along columns after its x/y swap.
    out = np.asarray(D.apply_transform(jnp.asarray(x), _params(tx=2.0), mode, 7.0))
    np.testing.assert_allclose(out[:, :, :-2], x[:, :, 2:], atol=1e-4)
    np.testing.assert_allclose(out[:, :, -2:], expected_tail(x), atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_matches_keras_image_data_generator():
    pytest.importorskip("scipy")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    image_mod = pytest.importorskip("keras.src.legacy.preprocessing.image")
    rng = np.random.default_rng(0)
    for h, w in ((12, 12), (9, 14)):
        x = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
        for mode in ("nearest", "reflect", "wrap", "constant"):
            gen = image_mod.ImageDataGenerator(fill_mode=mode, cval=7.0)
            for _ in range(4):
                p = {
                    "theta": rng.uniform(-30, 30),
                    "tx": rng.uniform(-3, 3),
                    "ty": rng.uniform(-3, 3),
                    "shear": rng.uniform(-20, 20),
                    "zx": rng.uniform(0.8, 1.2),
                    "zy": rng.uniform(0.8, 1.2),
                    "flip_horizontal": bool(rng.integers(2)),
                    "flip_vertical": bool(rng.integers(2)),
                }
                ref = gen.apply_transform(x, p)
                ours = np.asarray(
                    D.apply_transform(
                        jnp.asarray(x[None]), {k: jnp.asarray([v]) for k, v in p.items()}, mode, 7.0
                    )
                )[0]
                np.testing.assert_allclose(ours, ref, atol=5e-3, err_msg=f"{mode} {p}")


def test_random_parameters_follow_keras_distributions():
    n, h, w = 4096, 40, 50
    tutorial = D.augment_preset("tutorial").keras_affine.to_dict()
    p = D.sample_transform_params(
        KEY, n, h, w, **{k: v for k, v in tutorial.items() if k not in ("fill_mode", "cval")}
    )
    p = {k: np.asarray(v) for k, v in p.items()}
    assert np.abs(p["theta"]).max() <= 20 and p["theta"].std() > 10  # U(-20, 20): std 11.5
    assert np.abs(p["tx"]).max() <= 0.2 * h and np.abs(p["tx"]).max() > 0.19 * h
    assert np.abs(p["ty"]).max() <= 0.2 * w and np.abs(p["ty"]).max() > 0.19 * w
    assert np.abs(p["shear"]).max() <= 0.15
    for z in ("zx", "zy"):
        assert p[z].min() >= 0.85 and p[z].max() <= 1.15
    assert np.corrcoef(p["zx"], p["zy"])[0, 1] < 0.1  # drawn independently
    assert 0.45 < p["flip_horizontal"].mean() < 0.55 and not p["flip_vertical"].any()
    # Integer shift: Keras draws np.random.choice(s) (0..s-1) times a random sign, in pixels.
    q = D.sample_transform_params(KEY, n, h, w, width_shift_range=3)
    ty = np.asarray(q["ty"])
    assert set(np.unique(ty).tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0} and np.abs(ty).max() == 2


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_shapes_dtypes_and_determinism(dtype):
    x = jnp.asarray(_img(8, 16, 12, dtype=dtype))
    pipeline = D.augment_pipeline(D.augment_preset("tutorial"), 3)
    labels = jnp.arange(8) % 3

    def fn(key):
        return pipeline(key, x, labels)[0]

    a = fn(jax.random.PRNGKey(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(fn(jax.random.PRNGKey(1))))
    assert not np.array_equal(np.asarray(a), np.asarray(fn(jax.random.PRNGKey(2))))
    assert float(jnp.min(a)) >= 0 and float(jnp.max(a)) <= 255
    # The op is random_affine with the preset's values, on the op's own key.
    tutorial = D.augment_preset("tutorial").keras_affine.to_dict()
    direct = D.augment(jax.random.split(jax.random.PRNGKey(1), 1)[0], x, **tutorial)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(a))


# --------------------------------------------------------------------------- crop and mixing


def test_random_crop_is_a_window_of_the_padded_image():
    x = _img(6, 8, 8, dtype=np.uint8)
    out = np.asarray(D.random_crop(jax.random.PRNGKey(4), jnp.asarray(x), 2))
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for o, p in zip(out, padded, strict=True):
        assert any(np.array_equal(o, p[i : i + 8, j : j + 8]) for i in range(5) for j in range(5))
    np.testing.assert_array_equal(np.asarray(D.random_crop(KEY, jnp.asarray(x), 0)), x)
    ref = np.asarray(D.random_crop(KEY, jnp.asarray(x), 2, "reflect"))
    assert ref.shape == x.shape


def test_mixup_and_cutmix():
    x = jnp.asarray(_img(8, 8, 8, dtype=np.uint8))
    y = jax.nn.one_hot(jnp.arange(8) % 3, 3)
    mx, my = D.mixup(KEY, x, y, 0.4)
    assert mx.shape == x.shape and mx.dtype == jnp.float32 and my.shape == (8, 3)
    np.testing.assert_allclose(np.asarray(my).sum(1), 1.0, rtol=1e-6)
    cx, cy = D.cutmix(jax.random.PRNGKey(7), x, y, 1.0)
    assert cx.shape == x.shape and cx.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(cy).sum(1), 1.0, rtol=1e-6)
    # Every cutmix pixel comes from the image itself or from one other image of the batch.
    changed = np.any(np.asarray(cx) != np.asarray(x), axis=-1)
    area = changed.mean(axis=(1, 2))
    assert np.all(area <= 1.0)
    config = {"ops": ("keras_affine", "mixup_or_cutmix"), "keras_affine": {"horizontal_flip": True}}
    fn = D.augment_pipeline(config, 3)
    seen = set()
    for seed in range(8):  # each batch is either mixup (float, blended) or cutmix (pasted pixels)
        bx, by = fn(jax.random.PRNGKey(seed), x, jnp.arange(8) % 3)
        assert bx.shape == x.shape and bx.dtype == jnp.float32 and by.shape == (8, 3)
        np.testing.assert_allclose(np.asarray(by).sum(1), 1.0, rtol=1e-6)
        seen.add(bool(np.all(np.asarray(bx) == np.round(np.asarray(bx)))))
    assert seen == {True, False}
    plain = D.augment_pipeline(None, 3)
    px, py = plain(KEY, x, jnp.arange(8) % 3)
    np.testing.assert_array_equal(np.asarray(px), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(py), np.asarray(y))


_AFFINE = ("rotation_range", "zoom_range", "width_shift_range", "height_shift_range", "shear_range")


@pytest.mark.parametrize(
    "values",
    [
        {"keras_affine.rotation_range": 20.0, "keras_affine.zoom_range": 0.15,
         "keras_affine.width_shift_range": 0.2, "keras_affine.height_shift_range": 3.0,
         "keras_affine.shear_range": 0.15, "mixup_or_cutmix.mixup_alpha": 0.3,
         "mixup_or_cutmix.cutmix_alpha": 1.0},
        {**{f"keras_affine.{k}": 0.0 for k in _AFFINE}, "mixup_or_cutmix.mixup_alpha": 0.2,
         "mixup_or_cutmix.cutmix_alpha": 0.5},
    ],
)
def test_traced_values_give_what_the_same_python_values_give(values):
    # Packed sweep trials pass their augmentation strengths as traced scalars into a pipeline
    # built from another trial's config (same structure: ops, flips, fill mode, float forms).
    x = jnp.asarray(_img(8, 12, 12, dtype=np.uint8))
    labels = jnp.arange(8) % 3
    structure = {"ops": ("keras_affine", "mixup_or_cutmix"),
                 "keras_affine": {"horizontal_flip": True, "fill_mode": "reflect", "rotation_range": 5.0,
                                  "zoom_range": 0.05, "width_shift_range": 0.1,
                                  "height_shift_range": 0.1, "shear_range": 1.0},
                 "mixup_or_cutmix": {"mixup_alpha": 0.1, "cutmix_alpha": 0.1}}
    same = {**structure, "keras_affine": dict(structure["keras_affine"]),
            "mixup_or_cutmix": dict(structure["mixup_or_cutmix"])}
    for key, v in values.items():
        op, param = key.split(".")
        same[op][param] = v
    want = D.augment_pipeline(same, 3)(KEY, x, labels)
    fn = D.augment_pipeline(structure, 3)
    assert set(fn.traceable()) == set(values)
    assert fn.structure() == D.augment_pipeline(same, 3).structure()
    traced = {k: jnp.float32(v) for k, v in values.items()}
    got = jax.jit(lambda t: fn(KEY, x, labels, t))(traced)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-4, rtol=0)
    if not values["keras_affine.rotation_range"]:  # traced zeros still draw, and draw the identity
        affine = D.augment_pipeline({"ops": ("keras_affine",),
                                     "keras_affine": {"rotation_range": 5.0, "zoom_range": 0.1}}, 3)
        zeros = {f"keras_affine.{k}": jnp.float32(0.0) for k in _AFFINE}
        out, _ = jax.jit(lambda t: affine(KEY, x, labels, t))(zeros)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_parameters_that_cannot_be_traced_are_named():
    fn = D.augment_pipeline({"ops": ("keras_affine",),
                             "keras_affine": {"width_shift_range": [-2, 2], "rotation_range": 3.0}}, 3)
    assert fn.traceable() == {"keras_affine.rotation_range": 3.0, "keras_affine.height_shift_range": 0.0,
                              "keras_affine.shear_range": 0.0, "keras_affine.zoom_range": 0.0}
    assert fn.structure()["keras_affine"]["width_shift_range"] == [-2, 2]
    assert fn.structure()["keras_affine"]["rotation_range"] == "traced"
    x = jnp.zeros((2, 8, 8, 3), jnp.uint8)
    labels = jnp.zeros((2,), jnp.int32)
    for name in ("keras_affine.width_shift_range", "keras_affine.fill_mode", "mixup.alpha"):
        with pytest.raises(ValueError, match=name):
            fn(KEY, x, labels, {name: jnp.float32(0.1)})


def test_structure_separates_what_a_program_depends_on():
    base = {"ops": ("keras_affine", "mixup"), "keras_affine": {"rotation_range": 10.0}}
    s = D.augment_pipeline(base, 3).structure()
    assert s == D.augment_pipeline({**base, "keras_affine": {"rotation_range": 2.0},
                                    "mixup": {"alpha": 0.7}}, 3).structure()
    json.dumps(s)
    for other in ({**base, "ops": ("mixup", "keras_affine")}, {"ops": ("keras_affine",)},
                  {**base, "keras_affine": {"rotation_range": 10.0, "horizontal_flip": True}}):
        assert D.augment_pipeline(other, 3).structure() != s


def test_tutorial_preset_is_the_keras_tutorial():
    tut = D.augment_preset("tutorial")
    assert tut.ops == ("keras_affine",)
    a = tut.keras_affine
    assert (a.rotation_range, a.zoom_range, a.width_shift_range, a.height_shift_range,
            a.shear_range, a.horizontal_flip, a.vertical_flip, a.fill_mode) == (
        20.0, 0.15, 0.2, 0.2, 0.15, True, False, "nearest")
    assert D.augment_preset("none").ops == ()
    with pytest.raises(ValueError, match="tutorial"):
        D.augment_preset("tutorail")


_USER_OP = """
import jax.numpy as jnp
from cnnlab.data import register_augment
from cnnlab.schema import Field, in_range

@register_augment("brighten_test_op", amount=Field(10.0, float, in_range(0, 255), "added", traceable=True),
                  clip=Field(True, bool, doc="clip to 255"))
def brighten(key, images, labels, *, amount, clip):
    out = images.astype(jnp.float32) + amount
    return (jnp.minimum(out, 255.0) if clip else out), labels
"""


def test_a_user_op_registered_from_a_module_of_their_own(tmp_path, monkeypatch):
    from cnnlab.train import default_config, validate_config

    (tmp_path / "my_augment.py").write_text(_USER_OP)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("my_augment")
    config = default_config()  # a config file that imported my_augment first
    config.data.augment.ops = ("keras_affine", "brighten_test_op")
    config.data.augment.brighten_test_op.amount = 250.0
    resolved = validate_config(config)
    assert resolved.data.augment.brighten_test_op.to_dict() == {"amount": 250.0, "clip": True}
    config.data.augment.brighten_test_op.amount = 300.0
    with pytest.raises(ValueError, match=r"'data.augment.brighten_test_op.amount': invalid value 300.0"):
        validate_config(config)
    pipeline = D.augment_pipeline(resolved.data.augment, 3)
    assert pipeline.traceable()["brighten_test_op.amount"] == 250.0
    x = jnp.asarray(_img(4, 6, 6, dtype=np.uint8))
    out, labels = pipeline(KEY, x, jnp.arange(4) % 3)
    np.testing.assert_array_equal(np.asarray(out), np.minimum(np.asarray(x, np.float32) + 250.0, 255.0))
    traced, _ = jax.jit(lambda t: pipeline(KEY, x, jnp.arange(4) % 3, t))({"brighten_test_op.amount": 1.0})
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(x, np.float32) + 1.0)
    with pytest.raises(ValueError, match=r"did you mean 'brighten_test_op'"):
        validate_config({**config.to_dict(), "data": {"augment": {"ops": ("brighten_test_opp",)}}})
