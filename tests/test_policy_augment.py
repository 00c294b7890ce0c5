"""The policy and small-data augmentation ops (cnnlab.data.policy): each image op equals PIL's
ImageOps/ImageEnhance (what torchvision's TrivialAugment and RandAugment call) within one grey
level, the geometric ops move pixels where they should, the crops and erasing keep their
areas, and traced magnitudes give what the config's values give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from cnnlab.data import augment_pipeline, policy
from cnnlab.data.augmentations import augment_schema
from cnnlab.schema import ConfigError, default_config


def _images(n=3, size=20, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 200, (n, size, size, 3)).astype(np.uint8)
    base[:, : size // 2] //= 2  # some structure, so equalize/autocontrast have work
    return base


def _apply(images, name, value):
    b = images.shape[0]
    op = jnp.full((b,), policy.POLICY_OPS.index(name))
    return np.asarray(policy.apply_ops(jnp.asarray(images), op, jnp.full((b,), value, jnp.float32)))


@pytest.mark.parametrize("name,value,pil", [
    ("brightness", 0.5, lambda im: ImageEnhance.Brightness(im).enhance(1.5)),
    ("color", -0.6, lambda im: ImageEnhance.Color(im).enhance(0.4)),
    ("contrast", 0.7, lambda im: ImageEnhance.Contrast(im).enhance(1.7)),
    ("sharpness", 0.9, lambda im: ImageEnhance.Sharpness(im).enhance(1.9)),
    ("posterize", 3.0, lambda im: ImageOps.posterize(im, 5)),
    ("solarize", 120.0, lambda im: ImageOps.solarize(im, 120)),
    ("autocontrast", 0.0, ImageOps.autocontrast),
    ("equalize", 0.0, ImageOps.equalize),
    ("identity", 0.0, lambda im: im),
])
def test_each_image_op_equals_pils(name, value, pil):
    images = _images()
    got = _apply(images, name, value)
    want = np.stack([np.asarray(pil(Image.fromarray(im))) for im in images])
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name


def test_the_geometric_ops_move_pixels_where_they_should():
    images = _images(2, 16)
    np.testing.assert_array_equal(_apply(images, "translate_x", 3.0)[:, :, 3:], images[:, :, :-3])
    assert (_apply(images, "translate_x", 3.0)[:, :, :3] == 0).all()  # filled with 0
    np.testing.assert_array_equal(_apply(images, "translate_y", -2.0)[:, :-2], images[:, 2:])
    rotated = _apply(images, "rotate", 90.0)  # inside the border (float rounding at the edge)
    np.testing.assert_array_equal(rotated[:, 1:-1, 1:-1], np.rot90(images, 3, axes=(1, 2))[:, 1:-1, 1:-1])
    for name in ("shear_x", "shear_y", "rotate"):
        np.testing.assert_array_equal(_apply(images, name, 0.0), images)
    odd = _images(2, 15)
    sheared = _apply(odd, "shear_x", 0.5)  # about the centre: its row stays, the next moves 1/2 px
    np.testing.assert_array_equal(sheared[:, 7], odd[:, 7])
    assert not np.array_equal(sheared[:, 9], odd[:, 9])


def test_policies_draw_per_image_and_keep_shape_and_dtype():
    x = jnp.asarray(_images(8, 24))
    for out in (policy.trivial_augment(jax.random.PRNGKey(1), x),
                policy.rand_augment(jax.random.PRNGKey(1), x, num_ops=2, magnitude=9.0)):
        assert out.shape == x.shape and out.dtype == x.dtype
        changed = [not np.array_equal(o, i) for o, i in zip(np.asarray(out), np.asarray(x))]
        assert sum(changed) >= 4  # most images changed, each its own way
    # RandAugment at magnitude 0: only the ops without magnitude can change an image
    same = policy.rand_augment(jax.random.PRNGKey(2), x, num_ops=1, magnitude=0.0)
    assert out.shape == same.shape


def test_random_resized_crop_and_erasing_keep_their_areas():
    x = jnp.asarray(_images(4, 24))
    key = jax.random.PRNGKey(0)
    whole = policy.random_resized_crop(key, x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(x))  # the whole image, unchanged
    zoomed = policy.random_resized_crop(key, x, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert not np.array_equal(np.asarray(zoomed), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(policy.random_erasing(key, x, p=0.0, scale=(0.1, 0.2), ratio=(1, 1))),
                                  np.asarray(x))
    erased = np.asarray(policy.random_erasing(key, x, p=1.0, scale=(0.1, 0.2), ratio=(0.5, 2.0)))
    share = (erased != np.asarray(x)).any(-1).mean(axis=(1, 2))
    assert ((share > 0.05) & (share < 0.25)).all(), share


def test_color_jitter_at_zero_is_the_identity_and_hue_keeps_grey():
    x = jnp.asarray(_images(3, 12))
    none = policy.color_jitter(jax.random.PRNGKey(0), x, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert np.abs(np.asarray(none).astype(int) - np.asarray(x).astype(int)).max() <= 1
    grey = jnp.full((2, 8, 8, 3), 90, jnp.uint8)
    turned = policy.color_jitter(jax.random.PRNGKey(0), grey, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)
    assert np.abs(np.asarray(turned).astype(int) - 90).max() <= 1


def test_the_ops_through_the_config_with_traced_magnitudes_and_checked_values():
    c = default_config(augment_schema())
    c.ops = ("rand_augment", "random_erasing", "color_jitter")
    pipe = augment_pipeline(c, 3)
    assert set(pipe.traceable()) == {"rand_augment.magnitude", "random_erasing.p", "color_jitter.brightness",
                                     "color_jitter.contrast", "color_jitter.saturation", "color_jitter.hue"}
    x, labels = jnp.asarray(_images(4, 16)), jnp.arange(4) % 3
    plain, _ = pipe(jax.random.PRNGKey(3), x, labels)
    traced, _ = pipe(jax.random.PRNGKey(3), x, labels, {"rand_augment.magnitude": jnp.float32(9.0),
                                                        "random_erasing.p": jnp.float32(0.25)})
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(traced))
    c.random_resized_crop.scale = (0.5, 0.2)
    c.ops = ("random_resized_crop",)
    with pytest.raises(ConfigError, match=r"'data.augment.random_resized_crop.scale': invalid value \(0.5, 0.2\)"):
        augment_pipeline(c, 3)
