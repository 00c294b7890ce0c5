"""Pure-JAX layers with Keras 3 semantics: arrays in, arrays out, no Flax.

>>> import jax, jax.numpy as jnp
>>> import cnnlab.functional as F
>>> p = F.init_conv(jax.random.key(0), in_channels=3, filters=8, kernel_size=3,
...                 kernel_initializer="he_normal")
>>> F.conv2d(jnp.ones((4, 32, 32, 3)), p["kernel"], p["bias"], padding="same").shape
(4, 32, 32, 8)
"""

from cnnlab.functional.conv import (
    conv,
    conv1d,
    conv2d,
    conv3d,
    conv_transpose,
    depthwise_conv,
    init_conv,
    separable_conv,
)
from cnnlab.functional.core import (
    batch_norm,
    batch_norm_training,
    bernoulli,
    dense,
    dropout,
    moments,
)
from cnnlab.functional.pooling import avg_pool, global_avg_pool, global_max_pool, max_pool

__all__ = [
    "avg_pool",
    "batch_norm",
    "batch_norm_training",
    "bernoulli",
    "conv",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose",
    "dense",
    "depthwise_conv",
    "dropout",
    "global_avg_pool",
    "global_max_pool",
    "init_conv",
    "max_pool",
    "moments",
    "separable_conv",
]
