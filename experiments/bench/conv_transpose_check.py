"""A transposed convolution's forward + gradients: Keras' JAX form (``lax.conv_transpose``, the
strides as ``lhs_dilation``) against cnnlab's (the strides' zeros inserted by ``lax.pad``).

    python experiments/bench/conv_transpose_check.py      # ms, best of 7, batch 32

The shape is a decoder's upsampling layer: 24x24x64 -> 48x48x32, kernel 3, strides 2, 'same'.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cnnlab.runtime  # noqa: E402

cnnlab.runtime.configure()  # XLA:CPU settings before JAX starts
from cnnlab import functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import jax_ms  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 24, 24, 64), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 32, 64), np.float32) * 0.1)
    from keras.src.backend.jax.nn import conv_transpose  # needs pip install -e ".[keras]"

    def keras_form(x, k):
        return conv_transpose(x, k, 2, "same", data_format="channels_last")

    def cnnlab_form(x, k):
        return F.conv_transpose(x, k, strides=2, padding="same")

    assert float(jnp.abs(keras_form(x, k) - cnnlab_form(x, k)).max()) < 1e-4
    for name, f in (("lax.conv_transpose (Keras)", keras_form), ("cnnlab.functional.conv_transpose", cnnlab_form)):
        fwd = jax.jit(f)
        grad = jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), (0, 1)))
        print(f"{name:34s} forward {jax_ms(fwd, x, k, repeats=7, reduce=min):7.2f} ms   forward+gradients {jax_ms(grad, x, k, repeats=7, reduce=min):7.2f} ms")


if __name__ == "__main__":
    main()
