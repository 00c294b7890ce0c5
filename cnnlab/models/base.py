"""The fields and pieces the built-in models share."""

from __future__ import annotations

from typing import Any

import flax.linen as flax_nn
import jax

from cnnlab import nn


class Classifier(flax_nn.Module):
    """Base of the built-in models: ``num_classes`` logits, Keras' ``kernel_initializer``, an L2
    penalty ``weight_decay`` on convolution kernels and a ``head_dropout`` rate (both may be
    traced values) and the compute ``dtype``."""

    num_classes: int
    kernel_initializer: Any = "he_normal"  # Keras name or config of the kernels' initializer
    weight_decay: float = 1e-4  # L2 penalty on convolution kernels (Keras l2)
    head_dropout: float = 0.0  # dropout rate before the logits
    dtype: Any = None  # compute dtype (set by mixed_precision; parameters stay float32)

    def conv_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of every convolution: initializer, L2 penalty and dtype."""
        return dict(kernel_initializer=self.kernel_initializer,
                    kernel_regularizer=nn.l2_or_none(self.weight_decay), dtype=self.dtype)

    def pooled_head(self, x: jax.Array, training: bool) -> jax.Array:
        """Global average pooling -> Dropout(``head_dropout``) -> Dense logits (float32)."""
        x = nn.GlobalAveragePooling2D()(x)
        x = nn.Dropout(self.head_dropout)(x, training=training)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype("float32")
