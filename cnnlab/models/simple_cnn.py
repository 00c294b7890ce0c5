"""The tutorial's plain stack: Conv32-Pool-Conv64-Pool-Conv128-Pool and a classifier head."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as flax_nn
import jax

from cnnlab import nn
from cnnlab.models.base import Classifier
from cnnlab.models.registry import register


@register("simple_cnn", traceable=("weight_decay", "head_dropout"))
class SimpleCNN(Classifier):
    """For each width: Conv 3x3 same + ReLU -> MaxPool 2x2; then Flatten -> Dense -> ReLU ->
    Dropout -> Dense ``num_classes`` (logits)."""

    widths: Sequence[int] = (32, 64, 128)  # filters of each conv-pool stage
    kernel_size: int = 3  # kernel size of every convolution
    padding: str = "same"  # Keras padding of every convolution
    dense_units: int = 256  # units of the hidden dense layer
    weight_decay: float = 0.0  # L2 penalty on convolution kernels
    head_dropout: float = 0.5  # dropout rate before the logits
    global_pool: bool = False  # global average pooling instead of flattening

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        for width in self.widths:
            x = nn.Conv2D(width, self.kernel_size, padding=self.padding, activation="relu",
                          **self.conv_kwargs())(x)
            x = nn.MaxPooling2D((2, 2))(x)
        x = nn.GlobalAveragePooling2D()(x) if self.global_pool else nn.Flatten()(x)
        x = nn.Dense(self.dense_units, activation="relu", kernel_initializer=self.kernel_initializer,
                     dtype=self.dtype)(x)
        x = nn.Dropout(self.head_dropout)(x, training=training)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype("float32")
