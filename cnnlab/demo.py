"""A one-minute tour of the layer API: functional conv2d, the Flax Conv2D, penalties, constraints.

Run with ``python -m cnnlab.demo``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import cnnlab.functional as F
from cnnlab import nn


def main() -> None:
    key = jax.random.key(0)
    x = jax.random.uniform(key, (8, 96, 96, 3))

    params = F.init_conv(key, in_channels=3, filters=16, kernel_size=7, kernel_initializer="he_normal")
    y = jax.jit(lambda x, p: F.conv2d(x, p["kernel"], p["bias"], strides=2))(x, params)
    print(f"functional conv2d: {x.shape} -> {y.shape}")

    layer = nn.Conv2D(
        32,
        3,
        padding="same",
        activation="relu",
        kernel_regularizer={"class_name": "L2", "config": {"l2": 5e-4}},
        kernel_constraint="max_norm",
    )
    variables = layer.init(key, y)
    out, aux = layer.apply(variables, y, mutable=[nn.LOSSES])
    print(f"nn.Conv2D: {y.shape} -> {out.shape}; kernel {variables['params']['kernel'].shape}")
    print(f"penalties sown: {jax.tree_util.tree_map(float, aux[nn.LOSSES])}")
    print(f"total regularization loss: {float(nn.regularization_loss(aux[nn.LOSSES])):.6f}")
    constraints = nn.collect_constraints(layer, y)
    projected = nn.apply_constraints(variables["params"], constraints)
    # Keras' MaxNorm defaults to axis=0, the first kernel dimension.
    norms = jnp.sqrt(jnp.sum(projected["kernel"] ** 2, axis=0))
    print(f"max_norm constraint on {list(constraints)}: largest norm along axis 0 {float(norms.max()):.3f} <= 2")


if __name__ == "__main__":
    main()
