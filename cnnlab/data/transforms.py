"""On-device normalization and augmentation (jit-compiled JAX).

:func:`augment` reproduces Keras' ``ImageDataGenerator`` geometry
(``keras/src/legacy/preprocessing/image.py``: ``get_random_transform``,
``apply_affine_transform``, ``apply_transform``):

* parameters are drawn per example as Keras draws them: rotation ``theta ~ U(-r, r)``
  degrees; ``tx`` from ``height_shift_range`` and ``ty`` from ``width_shift_range``: a float
  ``s`` gives ``U(-s, s)``, times the image height (width) when ``s < 1`` (pixels otherwise),
  an int ``s`` gives an integer in ``[0, s)`` with a random sign, a list gives one of its values
  with a random sign; shear ``U(-s, s)`` degrees; ``zoom_range=z`` means ``[1-z, 1+z]`` (or a
  pair ``[lo, hi]``), with ``zx`` and ``zy`` drawn independently; each flip with p=0.5;
* the matrix is ``rotation @ shift @ shear @ zoom`` about the centre, with Keras' x/y swap,
  so the same parameters give Keras' output (including its quirks: the centre offset uses
  ``(w/2-0.5, h/2-0.5)`` for (row, col), which only matters for non-square images, and
  ``tx`` moves along columns);
* the flips (applied by Keras after the warp) are folded into the same matrix: ONE affine
  map per image, output pixel ``o = (row, col)`` reads input ``A @ o + b``;
* the input is sampled as ``scipy.ndimage.affine_transform(order=1)`` does: bilinear, with
  fill modes ``nearest`` (clamp to the edge), ``reflect`` (half-sample symmetric:
  ``d c b a | a b c d | d c b a``), ``wrap`` (scipy's ``wrap``: period ``n - 1``, first and
  last samples coincide) and ``constant`` (``cval`` for any sample position outside
  ``[0, n-1]``).

uint8 input gives uint8 output (rounded, clipped); float input gives float output in the
same value range. With every range zero and no flips, :func:`augment` returns its input
unchanged (the exact identity).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------- normalization


@functools.partial(jax.jit, static_argnames=("mode",))
def normalize(
    images: jax.Array, mode: str = "scale", mean: Any = None, std: Any = None
) -> jax.Array:
    """uint8 (or float, 0..255) images -> float32.

    ``"scale"``: ``x / 255`` (the tutorial's). ``"mean_std"``: ``(x / 255 - mean) / std`` with
    per-channel ``mean`` and ``std`` in [0, 1] units (e.g. ImageNet's, or
    :func:`channel_mean_std` of the training images).
    """
    x = images.astype(jnp.float32) / 255.0
    if mode == "scale":
        return x
    if mode == "mean_std":
        if mean is None or std is None:
            raise ValueError("normalize(mode='mean_std') needs mean and std")
        return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    raise ValueError(f"normalize: unknown mode {mode!r}; expected 'scale' or 'mean_std'")


def channel_mean_std(images: Any, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1] units (host-side, chunked)."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for i in range(0, images.shape[0], chunk):
        x = np.asarray(images[i : i + chunk], dtype=np.float64) / 255.0
        s += x.sum(axis=(0, 1, 2))
        s2 += (x * x).sum(axis=(0, 1, 2))
        n += x.shape[0] * x.shape[1] * x.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean.tolist(), std.tolist()


# --------------------------------------------------------------------------- parameters


def _static_zero(v: Any) -> bool:
    """True for a Python (not traced) range of zero: that draw is skipped. A traced range (one
    per packed sweep trial) always draws, which at value zero gives exactly what skipping gives."""
    return not isinstance(v, jax.Array) and not v


def _shift_draw(u: jax.Array, u_sign: jax.Array, rng: Any, size: int) -> jax.Array:
    # u, u_sign: uniform [0, 1) draws of shape [B].
    if _static_zero(rng):
        return jnp.zeros_like(u)
    sign = jnp.where(u_sign < 0.5, -1.0, 1.0)
    if isinstance(rng, (tuple, list)):  # np.random.choice(list) * random sign
        vals = jnp.asarray(rng, jnp.float32)
        v = vals[jnp.minimum(jnp.floor(u * len(rng)).astype(jnp.int32), len(rng) - 1)] * sign
        top = max(rng)
    elif isinstance(rng, int) and not isinstance(rng, bool):  # np.random.choice(int) * random sign
        v = jnp.minimum(jnp.floor(u * rng), rng - 1) * sign
        top = rng
    else:  # np.random.uniform(-rng, rng)
        v = (2.0 * u - 1.0) * rng
        top = rng
    if isinstance(top, jax.Array):  # traced: a fraction of the size below 1, pixels from 1
        return jnp.where(top < 1, v * size, v)
    return v * size if top < 1 else v


def _zoom_bounds(zoom_range: Any) -> tuple[Any, Any]:
    # float32 arithmetic, so a Python zoom and the same value traced give the same bounds.
    if isinstance(zoom_range, (tuple, list)):
        return np.float32(zoom_range[0]), np.float32(zoom_range[1])
    if isinstance(zoom_range, jax.Array):
        z = zoom_range.astype(jnp.float32)
        return 1.0 - z, 1.0 + z
    return np.float32(1.0) - np.float32(zoom_range), np.float32(1.0) + np.float32(zoom_range)


def _static_no_zoom(zoom_range: Any) -> bool:
    if isinstance(zoom_range, jax.Array):
        return False
    lo, hi = _zoom_bounds(zoom_range)
    return bool(lo == 1.0 and hi == 1.0)


def sample_transform_params(
    key: jax.Array,
    batch_size: int,
    height: int,
    width: int,
    *,
    rotation_range: float = 0.0,
    width_shift_range: Any = 0.0,
    height_shift_range: Any = 0.0,
    shear_range: float = 0.0,
    zoom_range: Any = 0.0,
    horizontal_flip: bool = False,
    vertical_flip: bool = False,
) -> dict[str, jax.Array]:
    """Per-example random parameters, drawn as ``ImageDataGenerator.get_random_transform``.

    The ranges of the float forms may be traced scalars (see :func:`random_affine`).
    Returns ``theta, tx, ty, shear, zx, zy`` (float32 [B]) and ``flip_horizontal,
    flip_vertical`` (bool [B]) with Keras' meanings (``tx`` from ``height_shift_range`` scaled
    by ``height``, ``ty`` from ``width_shift_range`` scaled by ``width``).
    """
    b = batch_size
    # One draw for everything (fast to compile); each row is an independent U[0, 1).
    u = jax.random.uniform(key, (10, b), jnp.float32)

    def between(row, lo, hi):
        return lo + (hi - lo) * u[row]

    zeros = jnp.zeros((b,), jnp.float32)
    theta = zeros if _static_zero(rotation_range) else between(0, -rotation_range, rotation_range)
    tx = _shift_draw(u[1], u[2], height_shift_range, height)
    ty = _shift_draw(u[3], u[4], width_shift_range, width)
    shear = zeros if _static_zero(shear_range) else between(5, -shear_range, shear_range)
    if _static_no_zoom(zoom_range):
        zx = zy = jnp.ones((b,), jnp.float32)
    else:
        lo, hi = _zoom_bounds(zoom_range)
        zx, zy = between(6, lo, hi), between(7, lo, hi)
    fh = (u[8] < 0.5) & bool(horizontal_flip)
    fv = (u[9] < 0.5) & bool(vertical_flip)
    return {
        "theta": theta,
        "tx": tx,
        "ty": ty,
        "shear": shear,
        "zx": zx,
        "zy": zy,
        "flip_horizontal": fh,
        "flip_vertical": fv,
    }


def transform_matrices(params: dict[str, Any], height: int, width: int) -> jax.Array:
    """[B, 3, 3] matrices mapping output (row, col, 1) to input (row, col, 1) coordinates,
    built as Keras' ``apply_affine_transform`` builds its matrix, with the flips folded in."""
    f32 = jnp.float32
    theta = jnp.deg2rad(jnp.asarray(params["theta"], f32))
    b = theta.shape[0]
    tx = jnp.asarray(params.get("tx", jnp.zeros((b,))), f32)
    ty = jnp.asarray(params.get("ty", jnp.zeros((b,))), f32)
    sh = jnp.deg2rad(jnp.asarray(params.get("shear", jnp.zeros((b,))), f32))
    zx = jnp.asarray(params.get("zx", jnp.ones((b,))), f32)
    zy = jnp.asarray(params.get("zy", jnp.ones((b,))), f32)
    fh = jnp.asarray(params.get("flip_horizontal", jnp.zeros((b,), bool)), bool)
    fv = jnp.asarray(params.get("flip_vertical", jnp.zeros((b,), bool)), bool)
    one, zero = jnp.ones_like(theta), jnp.zeros_like(theta)

    def mat(rows):
        return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

    c, s = jnp.cos(theta), jnp.sin(theta)
    rot = mat([[c, -s, zero], [s, c, zero], [zero, zero, one]])
    shift = mat([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    shear = mat([[one, -jnp.sin(sh), zero], [zero, jnp.cos(sh), zero], [zero, zero, one]])
    zoom = mat([[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
    m = rot @ shift @ shear @ zoom
    # transform_matrix_offset_center(m, h, w): o_x = h/2 - 0.5 on the first ("x") axis.
    ox, oy = height / 2.0 - 0.5, width / 2.0 - 0.5
    offset = jnp.asarray([[1, 0, ox], [0, 1, oy], [0, 0, 1]], f32)
    reset = jnp.asarray([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]], f32)
    m = offset @ m @ reset
    # Keras swaps x and y for channels-last arrays: M' = P M P.
    perm = jnp.asarray([1, 0, 2])
    m = m[:, perm][:, :, perm]
    # Flips (Keras applies them after the warp) act on output coordinates.
    sv = jnp.where(fv, -1.0, 1.0).astype(f32)
    shh = jnp.where(fh, -1.0, 1.0).astype(f32)
    flip = mat(
        [
            [sv, zero, jnp.where(fv, height - 1.0, 0.0)],
            [zero, shh, jnp.where(fh, width - 1.0, 0.0)],
            [zero, zero, one],
        ]
    )
    return m @ flip


# --------------------------------------------------------------------------- warping


def _map_coordinate(x: jax.Array, n: int, mode: str) -> tuple[jax.Array, jax.Array | None]:
    """scipy.ndimage's boundary handling for order-1 interpolation (see module docstring)."""
    if n == 1:
        valid = (x >= 0) & (x <= 0) if mode == "constant" else None
        return jnp.zeros_like(x), valid
    hi = n - 1.0
    if mode == "nearest":
        return jnp.clip(x, 0.0, hi), None
    if mode == "reflect":
        p = 2.0 * n
        y = jnp.mod(x, p)
        y = jnp.where(y >= n, p - 1.0 - y, y)
        return jnp.clip(y, 0.0, hi), None
    if mode == "wrap":
        sz = hi
        y = jnp.where(x < 0, x + sz * (jnp.trunc(-x / sz) + 1.0), x)
        y = jnp.where(x > hi, x - sz * jnp.trunc(x / sz), y)
        return jnp.clip(y, 0.0, hi), None
    if mode == "constant":
        return jnp.clip(x, 0.0, hi), (x >= 0.0) & (x <= hi)
    raise ValueError(f"fill_mode: unknown mode {mode!r}")


def _warp_one(image: jax.Array, mat: jax.Array, fill_mode: str, cval: float) -> jax.Array:
    h, w, ch = image.shape
    rows = jnp.arange(h, dtype=jnp.float32)[:, None]
    cols = jnp.arange(w, dtype=jnp.float32)[None, :]
    r_in = mat[0, 0] * rows + mat[0, 1] * cols + mat[0, 2]
    c_in = mat[1, 0] * rows + mat[1, 1] * cols + mat[1, 2]
    r, r_ok = _map_coordinate(r_in, h, fill_mode)
    c, c_ok = _map_coordinate(c_in, w, fill_mode)
    r0f, c0f = jnp.floor(r), jnp.floor(c)
    fr, fc = (r - r0f)[..., None], (c - c0f)[..., None]
    r0 = r0f.astype(jnp.int32)
    c0 = c0f.astype(jnp.int32)
    r1 = jnp.minimum(r0 + 1, h - 1)
    c1 = jnp.minimum(c0 + 1, w - 1)
    flat = image.reshape(h * w, ch)

    def at(ri, ci):
        return jnp.take(flat, (ri * w + ci).reshape(-1), axis=0).reshape(h, w, ch)

    out = (
        ((1 - fr) * (1 - fc)) * at(r0, c0)
        + ((1 - fr) * fc) * at(r0, c1)
        + (fr * (1 - fc)) * at(r1, c0)
        + (fr * fc) * at(r1, c1)
    )
    if fill_mode == "constant":
        out = jnp.where((r_ok & c_ok)[..., None], out, jnp.asarray(cval, out.dtype))
    return out


def _to_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) if not jnp.issubdtype(images.dtype, jnp.floating) else images


def _like(x: jax.Array, dtype: Any) -> jax.Array:
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("fill_mode",))
def warp_affine(
    images: jax.Array, matrices: jax.Array, fill_mode: str = "nearest", cval: float = 0.0
) -> jax.Array:
    """Warps a batch [B, H, W, C] with per-image [B, 3, 3] output->input matrices (bilinear,
    scipy-style fill); the result has the input's dtype."""
    x = _to_float(images)
    out = jax.vmap(_warp_one, in_axes=(0, 0, None, None))(
        x, matrices.astype(jnp.float32), fill_mode, cval
    )
    return _like(out, images.dtype)


def apply_transform(
    images: jax.Array, params: dict[str, Any], fill_mode: str = "nearest", cval: float = 0.0
) -> jax.Array:
    """Applies fixed per-image parameters (``ImageDataGenerator.apply_transform`` semantics:
    affine warp then flips), e.g. for comparing with Keras."""
    _, h, w, _ = images.shape
    return warp_affine(images, transform_matrices(params, h, w), fill_mode, cval)


#: The affine/flip arguments of :func:`augment` (static under jit).
_AFFINE_KEYS = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range",
                "zoom_range", "horizontal_flip", "vertical_flip", "fill_mode")


def random_affine(
    key: jax.Array, images: jax.Array, *, fill_mode: str = "nearest", cval: float = 0.0, **ranges: Any
) -> jax.Array:
    """Keras ``ImageDataGenerator``-style random affine augmentation of a batch [B, H, W, C].

    ``ranges``: the ranges and flips of :func:`sample_transform_params`. See the module docstring
    for the exact semantics; all ranges zero and no flips is the exact identity. The float ranges
    may be traced scalars (one per packed sweep trial); a traced zero draws, and gives exactly
    what skipping the draw gives. :func:`augment` is this function jitted with the ranges static.
    """
    shifts = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range")
    if (all(_static_zero(ranges.get(k, 0.0)) for k in shifts)
            and _static_no_zoom(ranges.get("zoom_range", 0.0))
            and not (ranges.get("horizontal_flip") or ranges.get("vertical_flip"))):
        return images
    b, h, w, _ = images.shape
    params = sample_transform_params(key, b, h, w, **ranges)
    return warp_affine(images, transform_matrices(params, h, w), fill_mode, cval)


#: The jitted entry point: ranges static (hashable: numbers or tuples).
augment = jax.jit(random_affine, static_argnames=_AFFINE_KEYS)


# --------------------------------------------------------------------------- crop / mix


@functools.partial(jax.jit, static_argnames=("padding", "fill"))
def random_crop(
    key: jax.Array, images: jax.Array, padding: int = 4, fill: str = "constant", cval: float = 0.0
) -> jax.Array:
    """Pad-and-crop: pads each side by ``padding`` (``constant`` with ``cval``, ``reflect`` or
    ``edge``) and crops a random H x W window per image."""
    if padding <= 0:
        return images
    b, h, w, c = images.shape
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    if fill == "constant":
        padded = jnp.pad(
            images, pad, mode="constant", constant_values=jnp.asarray(cval).astype(images.dtype)
        )
    else:
        padded = jnp.pad(images, pad, mode=fill)
    u = jax.random.uniform(key, (2, b))
    oy = jnp.minimum(jnp.floor(u[0] * (2 * padding + 1)), 2 * padding).astype(jnp.int32)
    ox = jnp.minimum(jnp.floor(u[1] * (2 * padding + 1)), 2 * padding).astype(jnp.int32)

    def crop(img, y, x):
        return jax.lax.dynamic_slice(img, (y, x, 0), (h, w, c))

    return jax.vmap(crop)(padded, oy, ox)


_NCAND = 16  # Marsaglia-Tsang proposals per gamma draw
_GAMMA_U = 3 * _NCAND + 1  # uniforms consumed per gamma draw
_BETA_U = 2 * _GAMMA_U


def _log_gamma_from_uniforms(u: jax.Array, a: jax.Array) -> jax.Array:
    """log of a Gamma(a, 1) draw (scalar) from ``_GAMMA_U`` uniforms, without loops.

    Marsaglia-Tsang for Gamma(a + 1) on ``_NCAND`` proposals (normals by Box-Muller), keeping
    the first accepted one (each is accepted with probability > 0.95, so all failing has
    probability < 1e-20; the mode is used then), boosted to Gamma(a) with ``U ** (1 / a)``.
    A single uniform draw compiles much faster than ``jax.random.gamma``'s loops.
    """
    tiny = jnp.finfo(jnp.float32).tiny
    u = jnp.clip(u, tiny, 1.0)
    n = _NCAND
    z = jnp.sqrt(-2.0 * jnp.log(u[:n])) * jnp.cos(2.0 * jnp.pi * u[n : 2 * n])
    d = a + 1.0 - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    v = (1.0 + c * z) ** 3
    safe_v = jnp.where(v > 0, v, 1.0)
    ok = (v > 0) & (jnp.log(u[2 * n : 3 * n]) < 0.5 * z * z + d - d * safe_v + d * jnp.log(safe_v))
    first = jnp.argmax(ok)
    log_g1 = jnp.where(jnp.any(ok), jnp.log(d * safe_v[first]), jnp.log(d))
    return log_g1 + jnp.log(u[3 * n]) / a


def _beta_from_uniforms(u: jax.Array, alpha: Any, beta: Any = None) -> jax.Array:
    alpha = jnp.asarray(alpha, jnp.float32)
    beta = alpha if beta is None else jnp.asarray(beta, jnp.float32)
    return jax.nn.sigmoid(
        _log_gamma_from_uniforms(u[:_GAMMA_U], alpha)
        - _log_gamma_from_uniforms(u[_GAMMA_U:_BETA_U], beta)
    )


def sample_beta(key: jax.Array, alpha: Any, beta: Any = None) -> jax.Array:
    """A scalar Beta(alpha, beta) draw (beta defaults to alpha), from two gamma draws in log
    space (stable for small alpha)."""
    return _beta_from_uniforms(jax.random.uniform(key, (_BETA_U,)), alpha, beta)


@jax.jit
def mixup(
    key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 0.2
) -> tuple[jax.Array, jax.Array]:
    """Mixup: ``lam ~ Beta(alpha, alpha)`` per batch, mixed with a random permutation of the
    batch. ``labels`` are one-hot (or soft) [B, K]; returns float32 images (same value range)
    and float32 labels."""
    b = images.shape[0]
    u = jax.random.uniform(key, (_BETA_U + b,))
    lam = _beta_from_uniforms(u, alpha)
    perm = jnp.argsort(u[_BETA_U:])
    x = _to_float(images).astype(jnp.float32)
    y = labels.astype(jnp.float32)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


@jax.jit
def cutmix(
    key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """CutMix: pastes a random box from a permuted batch; box area ``(1 - lam) H W`` with
    ``lam ~ Beta(alpha, alpha)``, clipped at the border; labels are mixed by the actual box
    area. Returns images in the input dtype and float32 labels."""
    b, h, w, _ = images.shape
    u = jax.random.uniform(key, (_BETA_U + 2 + b,))
    lam = _beta_from_uniforms(u, alpha)
    perm = jnp.argsort(u[_BETA_U + 2 :])
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.floor(h * cut), jnp.floor(w * cut)
    cy = jnp.minimum(jnp.floor(u[_BETA_U] * h), h - 1)
    cx = jnp.minimum(jnp.floor(u[_BETA_U + 1] * w), w - 1)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows = jnp.arange(h, dtype=jnp.float32)[:, None]
    cols = jnp.arange(w, dtype=jnp.float32)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    out = jnp.where(box[None, :, :, None], images[perm], images)
    lam_adj = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    y = labels.astype(jnp.float32)
    return out, lam_adj * y + (1 - lam_adj) * y[perm]


__all__ = [
    "apply_transform",
    "augment",
    "channel_mean_std",
    "cutmix",
    "mixup",
    "normalize",
    "random_affine",
    "random_crop",
    "sample_transform_params",
    "transform_matrices",
    "warp_affine",
]
