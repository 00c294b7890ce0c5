"""Policy augmentation and the small-data crops, on device: TrivialAugment Wide, RandAugment,
random resized crops, random erasing and colour jitter (the ops behind ``data.augment.ops``
``trivial_augment``, ``rand_augment``, ``random_resized_crop``, ``random_erasing`` and
``color_jitter``, declared in :mod:`cnnlab.data.augmentations`).

The image ops follow PIL's ``ImageOps``/``ImageEnhance`` (what torchvision's policies call) on
images of 0..255 values, batched: each image of a batch draws its own op and sign, every op of a
policy is computed for the batch and each image keeps its own (so a policy is one traced
program, not a Python branch). Geometric ops (shear, translation, rotation about the centre)
are one affine warp per image, filled with 0 as torchvision does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from cnnlab.data.transforms import _like, _to_float, warp_affine

Array = jax.Array

#: The ops of both policies, in torchvision's order.
POLICY_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
              "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
              "autocontrast", "equalize")
_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
_SIGNED = (*_GEOMETRIC, "brightness", "color", "contrast", "sharpness")
MAGNITUDE_BINS = 31


def _wide_maxima(height: int, width: int) -> dict[str, float]:
    """TrivialAugment Wide's largest magnitudes (torchvision ``TrivialAugmentWide``)."""
    del height, width
    return {"shear_x": 0.99, "shear_y": 0.99, "translate_x": 32.0, "translate_y": 32.0,
            "rotate": 135.0, "brightness": 0.99, "color": 0.99, "contrast": 0.99,
            "sharpness": 0.99, "posterize": 6.0, "solarize": 255.0}


def _rand_maxima(height: int, width: int) -> dict[str, float]:
    """RandAugment's largest magnitudes (torchvision ``RandAugment``)."""
    return {"shear_x": 0.3, "shear_y": 0.3, "translate_x": 150.0 / 331.0 * width,
            "translate_y": 150.0 / 331.0 * height, "rotate": 30.0, "brightness": 0.9,
            "color": 0.9, "contrast": 0.9, "sharpness": 0.9, "posterize": 4.0, "solarize": 255.0}


def _gray(x: Array) -> Array:
    """PIL's ``L`` conversion (ITU-R 601-2 luma), kept as float, ``[..., 1]``."""
    return (x[..., 0:1] * 299 + x[..., 1:2] * 587 + x[..., 2:3] * 114) / 1000


def _blend(degenerate: Array, x: Array, factor: Array) -> Array:
    """PIL ``ImageEnhance``: ``degenerate + factor * (x - degenerate)``, clipped to 0..255."""
    return jnp.clip(degenerate + factor * (x - degenerate), 0.0, 255.0)


def _smooth(x: Array) -> Array:
    """PIL's SMOOTH filter (``[[1,1,1],[1,5,1],[1,1,1]] / 13``) inside, the border kept."""
    k = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
    c = x.shape[-1]
    kernel = jnp.tile(k[:, :, None, None], (1, 1, 1, c))
    inner = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", feature_group_count=c,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    inner = jnp.round(inner)
    return x.at[:, 1:-1, 1:-1, :].set(inner)


def _autocontrast(x: Array) -> Array:
    """PIL ``ImageOps.autocontrast`` (no cutoff): each channel stretched to 0..255."""
    lo = jnp.min(x, axis=(1, 2), keepdims=True)
    hi = jnp.max(x, axis=(1, 2), keepdims=True)
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    return jnp.where(hi > lo, jnp.clip(jnp.floor((x - lo) * scale), 0, 255), x)


def _equalize_channel(channel: Array) -> Array:
    """PIL ``ImageOps.equalize`` of one ``[H, W]`` channel of integer values 0..255."""
    values = channel.astype(jnp.int32).reshape(-1)
    hist = jnp.zeros(256, jnp.int32).at[values].add(1)
    last = jnp.max(jnp.where(hist > 0, jnp.arange(256), -1))
    step = (values.size - hist[last]) // 255
    lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(lut, 0, 255)
    return jnp.where(step > 0, lut[values].reshape(channel.shape), channel).astype(channel.dtype)


def _equalize(x: Array) -> Array:
    per_channel = jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)
    return jax.vmap(per_channel)(jnp.round(x))


def _matrices(op: Array, value: Array, height: int, width: int) -> Array:
    """``[B, 3, 3]`` output->input matrices (row, col) of the geometric ops, identity for the
    others; ``value`` is signed (shear factor, pixels, degrees)."""
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    is_ = {name: (op == POLICY_OPS.index(name)).astype(jnp.float32) for name in _GEOMETRIC}
    angle = jnp.deg2rad(value) * is_["rotate"]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    shear_x, shear_y = value * is_["shear_x"], value * is_["shear_y"]
    # rotation about the centre, then shears and translations (only one is nonzero per image)
    m00, m01 = cos, -sin + shear_y
    m10, m11 = sin + shear_x, cos
    m02 = cy - cos * cy + sin * cx - shear_y * cx - value * is_["translate_y"]
    m12 = cx - sin * cy - cos * cx - shear_x * cy - value * is_["translate_x"]
    zero, one = jnp.zeros_like(value), jnp.ones_like(value)
    return jnp.stack([jnp.stack([m00, m01, m02], -1), jnp.stack([m10, m11, m12], -1),
                      jnp.stack([zero, zero, one], -1)], -2)


def apply_ops(images: Array, op: Array, value: Array) -> Array:
    """Each image ``b`` of ``images [B, H, W, C]`` (0..255) through op ``POLICY_OPS[op[b]]``
    with the signed magnitude ``value[b]`` (shear factor, pixels, degrees, enhance delta (the
    factor is ``1 + value``), bits removed by posterize, solarize threshold); the result has the
    input's dtype."""
    _, h, w, _ = images.shape
    x = warp_affine(_to_float(images), _matrices(op, value, h, w), "constant", 0.0)
    x = jnp.round(x)  # PIL's warps give integer pixels
    v = value[:, None, None, None]
    bits = jnp.clip(8 - jnp.round(jnp.abs(v)), 1, 8)
    quantum = 2.0 ** (8 - bits)
    candidates = {
        "brightness": _blend(jnp.zeros_like(x), x, 1 + v),
        "color": _blend(_gray(x), x, 1 + v),
        "contrast": _blend(jnp.round(jnp.mean(_gray(x), axis=(1, 2, 3), keepdims=True)), x, 1 + v),
        "sharpness": _blend(_smooth(x), x, 1 + v),
        "posterize": jnp.floor(x / quantum) * quantum,
        "solarize": jnp.where(x >= jnp.abs(v), 255.0 - x, x),
        "autocontrast": _autocontrast(x),
        "equalize": _equalize(x),
    }
    out = x
    for name, candidate in candidates.items():
        out = jnp.where((op == POLICY_OPS.index(name))[:, None, None, None], jnp.round(candidate), out)
    return _like(out, images.dtype)


def _signed(key: Array, op: Array, magnitude: Array) -> Array:
    signed = jnp.isin(op, jnp.asarray([POLICY_OPS.index(n) for n in _SIGNED]))
    flip = jax.random.bernoulli(key, 0.5, op.shape)
    return jnp.where(signed & flip, -magnitude, magnitude)


def _values(op: Array, fraction: Array, maxima: dict[str, float]) -> Array:
    """The magnitude of each image's op at ``fraction`` (0..1) of its largest; solarize's
    threshold runs from 255 down."""
    table = jnp.asarray([maxima.get(name, 0.0) for name in POLICY_OPS], jnp.float32)
    value = table[op] * fraction
    return jnp.where(op == POLICY_OPS.index("solarize"), 255.0 - value, value)


def trivial_augment(key: Array, images: Array) -> Array:
    """TrivialAugment Wide (Mueller & Hutter 2021): each image one op drawn uniformly from
    :data:`POLICY_OPS`, at a magnitude drawn uniformly from 31 bins, with a random sign."""
    b, h, w, _ = images.shape
    k_op, k_mag, k_sign = jax.random.split(key, 3)
    op = jax.random.randint(k_op, (b,), 0, len(POLICY_OPS))
    fraction = jax.random.randint(k_mag, (b,), 0, MAGNITUDE_BINS) / (MAGNITUDE_BINS - 1)
    value = _values(op, fraction.astype(jnp.float32), _wide_maxima(h, w))
    return apply_ops(images, op, _signed(k_sign, op, value))


def rand_augment(key: Array, images: Array, *, num_ops: int, magnitude: Any) -> Array:
    """RandAugment (Cubuk et al. 2020): ``num_ops`` ops in turn, each drawn uniformly per image,
    all at ``magnitude`` of 30 (may be traced), with random signs."""
    b, h, w, _ = images.shape
    fraction = jnp.asarray(magnitude, jnp.float32) / (MAGNITUDE_BINS - 1)
    for k in jax.random.split(key, num_ops):
        k_op, k_sign = jax.random.split(k)
        op = jax.random.randint(k_op, (b,), 0, len(POLICY_OPS))
        value = _values(op, jnp.broadcast_to(fraction, (b,)), _rand_maxima(h, w))
        images = apply_ops(images, op, _signed(k_sign, op, value))
    return images


def _boxes(key: Array, batch: int, height: int, width: int, scale: tuple[Any, Any],
           ratio: tuple[Any, Any]) -> tuple[Array, Array, Array, Array]:
    """Per image ``(top, left, box_h, box_w)`` (float) of area ``U(scale) * H * W`` and aspect
    (w / h) log-uniform in ``ratio``, inside the image."""
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (batch,), minval=scale[0], maxval=scale[1]) * height * width
    log_r = jax.random.uniform(k_ratio, (batch,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    r = jnp.exp(log_r)
    box_w = jnp.clip(jnp.sqrt(area * r), 1.0, width)
    box_h = jnp.clip(jnp.sqrt(area / r), 1.0, height)
    top = jax.random.uniform(k_y, (batch,)) * (height - box_h)
    left = jax.random.uniform(k_x, (batch,)) * (width - box_w)
    return top, left, box_h, box_w


def random_resized_crop(key: Array, images: Array, *, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> Array:
    """Inception-style crops (torchvision ``RandomResizedCrop``): a box of ``scale`` of the
    area and aspect ratio in ``ratio`` (log-uniform), resized back to H x W (bilinear)."""
    b, h, w, _ = images.shape
    top, left, box_h, box_w = _boxes(key, b, h, w, scale, ratio)
    sy, sx = box_h / h, box_w / w
    zero, one = jnp.zeros_like(sy), jnp.ones_like(sy)
    # output pixel centre (r + 0.5) maps to top + (r + 0.5) * sy, in pixel-centre coordinates
    mats = jnp.stack([jnp.stack([sy, zero, top + 0.5 * sy - 0.5], -1),
                      jnp.stack([zero, sx, left + 0.5 * sx - 0.5], -1),
                      jnp.stack([zero, zero, one], -1)], -2)
    return warp_affine(images, mats, "nearest", 0.0)


def random_erasing(key: Array, images: Array, *, p: Any, scale: tuple[float, float],
                   ratio: tuple[float, float]) -> Array:
    """Random erasing (Zhong et al. 2020): with probability ``p`` per image, a box of ``scale``
    of the area (aspect in ``ratio``) replaced by uniform noise in 0..255."""
    b, h, w, c = images.shape
    k_box, k_apply, k_noise = jax.random.split(key, 3)
    top, left, box_h, box_w = _boxes(k_box, b, h, w, scale, ratio)
    top, left = jnp.round(top), jnp.round(left)
    rows = jnp.arange(h, dtype=jnp.float32)[None, :, None]
    cols = jnp.arange(w, dtype=jnp.float32)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + jnp.round(box_h))[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + jnp.round(box_w))[:, None, None]))
    erase = inside & jax.random.bernoulli(k_apply, p, (b,))[:, None, None]
    noise = jax.random.uniform(k_noise, images.shape, minval=0.0, maxval=256.0)
    out = jnp.where(erase[..., None], jnp.floor(noise), _to_float(images))
    return _like(out, images.dtype)


def color_jitter(key: Array, images: Array, *, brightness: Any, contrast: Any, saturation: Any,
                 hue: Any) -> Array:
    """torchvision ``ColorJitter`` in a fixed order: brightness, contrast, saturation factors
    ``~ U(1 - v, 1 + v)`` per image, then a hue rotation of ``U(-hue, hue)`` turns (in YIQ)."""
    b = images.shape[0]
    kb, kc, ks, kh = jax.random.split(key, 4)

    def factor(k, v):
        return jax.random.uniform(k, (b, 1, 1, 1), minval=-1.0, maxval=1.0) * v + 1.0

    x = _to_float(images)
    x = _blend(jnp.zeros_like(x), x, factor(kb, brightness))
    x = _blend(jnp.mean(_gray(x), axis=(1, 2, 3), keepdims=True), x, factor(kc, contrast))
    x = _blend(_gray(x), x, factor(ks, saturation))
    angle = jax.random.uniform(kh, (b,), minval=-1.0, maxval=1.0) * hue * 2 * math.pi
    to_yiq = jnp.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                         jnp.float32)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    zero, one = jnp.zeros_like(cos), jnp.ones_like(cos)
    rot = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, cos, -sin], -1),
                     jnp.stack([zero, sin, cos], -1)], -2)
    mats = jnp.linalg.inv(to_yiq)[None] @ rot @ to_yiq[None]  # [B, 3, 3] RGB -> RGB
    x = jnp.clip(jnp.einsum("bij,bhwj->bhwi", mats, x), 0.0, 255.0)
    return _like(x, images.dtype)
