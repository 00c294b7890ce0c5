"""Flax (linen) layers with Keras 3 names, signatures and defaults, built on `cnnlab.functional`.

>>> import jax, jax.numpy as jnp
>>> from cnnlab import nn
>>> conv = nn.Conv2D(8, (3, 3), padding="same", kernel_initializer="he_normal")
>>> variables = conv.init(jax.random.key(0), jnp.ones((2, 16, 16, 3)))
>>> variables["params"]["kernel"].shape
(3, 3, 3, 8)
"""

from cnnlab.nn.conv import Conv1D, Conv2D, Conv2DTranspose, Conv3D, DepthwiseConv2D, SeparableConv2D
from cnnlab.nn.layers import (
    Activation,
    AveragePooling2D,
    BatchNormalization,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    GlobalMaxPooling2D,
    MaxPooling2D,
)
from cnnlab.nn.penalties import (
    LOSSES,
    PenaltiesMixin,
    apply_constraints,
    collect_constraints,
    l2_or_none,
    regularization_loss,
)

__all__ = [
    "LOSSES",
    "Activation",
    "AveragePooling2D",
    "BatchNormalization",
    "Conv1D",
    "Conv2D",
    "Conv2DTranspose",
    "Conv3D",
    "Dense",
    "DepthwiseConv2D",
    "Dropout",
    "Flatten",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "MaxPooling2D",
    "PenaltiesMixin",
    "SeparableConv2D",
    "apply_constraints",
    "collect_constraints",
    "l2_or_none",
    "regularization_loss",
]
