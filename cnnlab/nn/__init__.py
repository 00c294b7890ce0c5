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
    LayerNormalization,
    LeakyReLU,
    MaxPooling2D,
    Normalization,
    ReLU,
    Rescaling,
    Softmax,
    SpatialDropout2D,
)
from cnnlab.nn.merging import Add, Average, Concatenate, Maximum, Minimum, Multiply, Subtract
from cnnlab.nn.penalties import (
    LOSSES,
    PenaltiesMixin,
    apply_constraints,
    collect_constraints,
    l2_or_none,
    regularization_loss,
)
from cnnlab.nn.reshaping import Cropping2D, Reshape, UpSampling2D, ZeroPadding2D

__all__ = [
    "LOSSES",
    "Activation",
    "Add",
    "Average",
    "AveragePooling2D",
    "BatchNormalization",
    "Concatenate",
    "Conv1D",
    "Conv2D",
    "Conv2DTranspose",
    "Conv3D",
    "Cropping2D",
    "Dense",
    "DepthwiseConv2D",
    "Dropout",
    "Flatten",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
    "LayerNormalization",
    "LeakyReLU",
    "MaxPooling2D",
    "Maximum",
    "Minimum",
    "Multiply",
    "Normalization",
    "PenaltiesMixin",
    "ReLU",
    "Rescaling",
    "Reshape",
    "SeparableConv2D",
    "Softmax",
    "SpatialDropout2D",
    "Subtract",
    "UpSampling2D",
    "ZeroPadding2D",
    "apply_constraints",
    "collect_constraints",
    "l2_or_none",
    "regularization_loss",
]
