"""Attempt: StridedNet's convolution gradients as im2col + matmul instead of XLA's own.

XLA CPU's kernel-gradient convolutions run at 20-60 GFLOP/s here while its matmul reaches
~240 (flops.py). Prediction: computing the kernel gradient as patches^T @ dy (and, with
DGRAD=mm, the input gradient as dy @ W^T scattered back with interior padding) through a
``jax.custom_vjp`` should make each layer's backward about 2x faster. This times, per
StridedNet layer, jitted grad of sum(conv(x, w)^2) with XLA's VJP and with the custom one,
and checks that both give the same gradients.

    python experiments/bench/conv_vjp_check.py            # batch 32, XLA input gradient
    B=128 DGRAD=mm python experiments/bench/conv_vjp_check.py
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import jax_ms  # noqa: E402

B = int(os.environ.get("B", 32))
MATMUL_DGRAD = os.environ.get("DGRAD") == "mm"
# (name, H_in, C_in, C_out, kernel, stride, padding), NHWC
CONVS = [("stem 7x7/2", 96, 3, 16, 7, 2, "VALID"), ("b1 3x3", 45, 16, 32, 3, 1, "SAME"),
         ("b1 3x3/2", 45, 32, 32, 3, 2, "SAME"), ("b2 3x3", 23, 32, 64, 3, 1, "SAME"),
         ("b2 3x3/2", 23, 64, 64, 3, 2, "SAME"), ("b3 3x3", 12, 64, 128, 3, 1, "SAME"),
         ("b3 3x3/2", 12, 128, 128, 3, 2, "SAME")]
DN = ("NHWC", "HWIO", "NHWC")


def pads(n: int, k: int, s: int, padding: str):
    """((low, high), output size) for one spatial dimension, TensorFlow's SAME."""
    if padding == "VALID":
        return (0, 0), (n - k) // s + 1
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return (total // 2, total - total // 2), out


def xla_conv(k: int, s: int, padding: str, n: int):
    (pl, ph), _ = pads(n, k, s, padding)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (s, s), [(pl, ph), (pl, ph)], dimension_numbers=DN)

    return conv


def patches(xp, k: int, s: int, ho: int):
    cols = [xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (ho - 1) + 1:s, :] for i in range(k) for j in range(k)]
    return jnp.concatenate(cols, axis=-1)  # N, Ho, Wo, k*k*C_in in HWIO order


def matmul_vjp_conv(k: int, s: int, padding: str, n: int):
    (pl, ph), ho = pads(n, k, s, padding)
    conv_xla = xla_conv(k, s, padding, n)

    @jax.custom_vjp
    def conv(x, w):
        return conv_xla(x, w)

    def fwd(x, w):
        return conv_xla(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        ci, co = w.shape[2], w.shape[3]
        xp = jnp.pad(x, ((0, 0), (pl, ph), (pl, ph), (0, 0)))
        cols = patches(xp, k, s, ho)
        m = cols.shape[0] * ho * ho
        dw = (cols.reshape(m, -1).T @ dy.reshape(m, co)).reshape(w.shape)
        if MATMUL_DGRAD:  # dy @ W^T, each kernel tap's share put back with interior padding
            dcols = (dy.reshape(m, co) @ w.reshape(-1, co).T).reshape(x.shape[0], ho, ho, k * k, ci)
            hp = xp.shape[1]
            span = s * (ho - 1) + 1
            dxp = jnp.zeros(xp.shape, x.dtype)
            for tap in range(k * k):
                i, j = divmod(tap, k)
                cfg = [(0, 0, 0), (i, hp - i - span, s - 1), (j, hp - j - span, s - 1), (0, 0, 0)]
                dxp = dxp + jax.lax.pad(dcols[:, :, :, tap, :], jnp.zeros((), x.dtype), cfg)
            dx = dxp[:, pl:pl + n, pl:pl + n, :]
        else:
            dx = jax.vjp(lambda x_: conv_xla(x_, w), x)[1](dy)[0]
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv


def grad_of(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"batch {B}, input gradient by {'matmul' if MATMUL_DGRAD else 'XLA'}; fwd+bwd ms")
    for name, n, ci, co, k, s, padding in CONVS:
        x = jnp.asarray(rng.standard_normal((B, n, n, ci)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, ci, co)) * 0.1, jnp.float32)
        ref, mine = grad_of(xla_conv(k, s, padding, n)), grad_of(matmul_vjp_conv(k, s, padding, n))
        err = max(float(jnp.max(jnp.abs(p - q)) / (jnp.max(jnp.abs(p)) + 1e-9))
                  for p, q in zip(ref(x, w), mine(x, w)))
        print(f"{name:12s} xla {jax_ms(ref, x, w, repeats=10):7.2f} ms   custom {jax_ms(mine, x, w, repeats=10):7.2f} ms   "
              f"relerr {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
