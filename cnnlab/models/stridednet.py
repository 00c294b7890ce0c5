"""StridedNet, the network of the Keras Conv2D tutorial (strided convolutions, no pooling)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as flax_nn
import jax

from cnnlab import nn
from cnnlab.backend import channel_axis
from cnnlab.models.base import Classifier
from cnnlab.models.registry import register


@register("stridednet", traceable=("weight_decay", "dropout", "head_dropout"))
class StridedNet(Classifier):
    """Conv16 7x7/2 valid (no activation); then for each width: Conv 3x3 same -> ReLU -> BN,
    Conv 3x3/2 same -> ReLU -> BN, Dropout 0.25; Flatten -> Dense 512 -> ReLU -> BN ->
    Dropout 0.5 -> Dense ``num_classes`` (logits).

    With the defaults (96x96x3 inputs, 4 classes) its parameter count equals the Keras model's.
    The L2 penalty (``weight_decay``, Keras' ``l2(5e-4)``) applies to convolution kernels only, as
    in the tutorial.
    """

    widths: Sequence[int] = (32, 64, 128)  # filters of each stage (two 3x3 convs, the second strided)
    stem_filters: int = 16  # filters of the 7x7/2 stem convolution
    dense_units: int = 512  # units of the hidden dense layer
    weight_decay: float = 5e-4  # L2 penalty on convolution kernels (the tutorial's l2(5e-4))
    dropout: float = 0.25  # dropout rate after each stage
    head_dropout: float = 0.5  # dropout rate before the logits

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        conv = self.conv_kwargs()
        x = nn.Conv2D(self.stem_filters, (7, 7), strides=(2, 2), padding="valid", **conv)(x)
        for width in self.widths:
            x = nn.Conv2D(width, (3, 3), padding="same", **conv)(x)
            x = nn.BatchNormalization(axis=channel_axis())(nn.Activation("relu")(x), training=training)
            x = nn.Conv2D(width, (3, 3), strides=(2, 2), padding="same", **conv)(x)
            x = nn.BatchNormalization(axis=channel_axis())(nn.Activation("relu")(x), training=training)
            x = nn.Dropout(self.dropout)(x, training=training)
        x = nn.Flatten()(x)
        x = nn.Dense(self.dense_units, kernel_initializer=self.kernel_initializer, dtype=self.dtype)(x)
        x = nn.BatchNormalization(axis=channel_axis())(nn.Activation("relu")(x), training=training)
        x = nn.Dropout(self.head_dropout)(x, training=training)
        x = nn.Dense(self.num_classes, kernel_initializer=self.kernel_initializer, dtype=self.dtype)(x)
        return x.astype("float32")
