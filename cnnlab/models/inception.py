"""An Inception-style network: parallel 1x1 / 3x3 / 5x5 (and pool-projection) branches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as flax_nn
import jax
import jax.numpy as jnp

from cnnlab import nn
from cnnlab.backend import channel_axis
from cnnlab.models.base import Classifier
from cnnlab.models.registry import register


class ConvBN(flax_nn.Module):
    """Conv -> BN -> ReLU, the unit of every branch."""

    filters: int
    kernel_size: int
    strides: int = 1
    conv_kwargs: Any = None

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        x = nn.Conv2D(self.filters, self.kernel_size, strides=self.strides, padding="same",
                      use_bias=False, **(self.conv_kwargs or {}))(x)
        return nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(x, training=training))


class InceptionModule(flax_nn.Module):
    """Concatenates a 1x1 branch, a 1x1->3x3 branch, a 1x1->5x5 branch and a pool->1x1 branch."""

    filters_1x1: int
    filters_3x3: int
    filters_5x5: int
    filters_pool: int
    conv_kwargs: Any = None

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        kw = self.conv_kwargs
        b1 = ConvBN(self.filters_1x1, 1, conv_kwargs=kw)(x, training)
        b3 = ConvBN(max(self.filters_3x3 // 2, 8), 1, conv_kwargs=kw)(x, training)
        b3 = ConvBN(self.filters_3x3, 3, conv_kwargs=kw)(b3, training)
        b5 = ConvBN(max(self.filters_5x5 // 2, 8), 1, conv_kwargs=kw)(x, training)
        b5 = ConvBN(self.filters_5x5, 5, conv_kwargs=kw)(b5, training)
        bp = nn.MaxPooling2D((3, 3), strides=(1, 1), padding="same")(x)
        bp = ConvBN(self.filters_pool, 1, conv_kwargs=kw)(bp, training)
        return jnp.concatenate([b1, b3, b5, bp], axis=channel_axis())


@register("inception", traceable=("weight_decay", "head_dropout"))
class InceptionNet(Classifier):
    """Stem conv, then stages of Inception modules separated by strided 3x3 downsampling;
    global average pooling and Dense logits. ``stage_widths[i]`` is a stage's branch width
    (1x1 = 3x3 = width, 5x5 = pool = width // 2)."""

    stem_filters: int = 32  # filters of the stem convolution
    stage_widths: Sequence[int] = (32, 64, 96)  # filters of each branch in each stage
    modules_per_stage: int = 1  # inception modules per stage

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        kw = self.conv_kwargs()
        x = ConvBN(self.stem_filters, 5, strides=2, conv_kwargs=kw)(x, training)
        for stage, width in enumerate(self.stage_widths):
            if stage > 0:
                x = ConvBN(x.shape[channel_axis()], 3, strides=2, conv_kwargs=kw)(x, training)
            for _ in range(self.modules_per_stage):
                x = InceptionModule(width, width, width // 2, width // 2, kw)(x, training)
        return self.pooled_head(x, training)
