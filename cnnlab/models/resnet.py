"""A small ResNet: bottleneck residual modules (1x1 -> 3x3 -> 1x1) with strided downsampling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as flax_nn
import jax

from cnnlab import nn
from cnnlab.backend import channel_axis
from cnnlab.models.base import Classifier
from cnnlab.models.registry import register


class ResidualModule(flax_nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1, plus shortcut."""

    filters: int
    strides: int = 1
    bottleneck: bool = True
    conv_kwargs: Any = None
    drop_path: Any = 0.0  # stochastic depth: probability of dropping the residual branch (may be traced)

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        kw = dict(self.conv_kwargs or {})
        shortcut = x
        y = nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(x, training=training))
        if self.strides != 1 or x.shape[channel_axis()] != self.filters:
            shortcut = nn.Conv2D(self.filters, 1, strides=self.strides, use_bias=False, **kw)(y)
        if self.bottleneck:
            mid = max(self.filters // 4, 8)
            y = nn.Conv2D(mid, 1, use_bias=False, **kw)(y)
            y = nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(y, training=training))
            y = nn.Conv2D(mid, 3, strides=self.strides, padding="same", use_bias=False, **kw)(y)
            y = nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(y, training=training))
            y = nn.Conv2D(self.filters, 1, use_bias=False, **kw)(y)
        else:
            y = nn.Conv2D(self.filters, 3, strides=self.strides, padding="same", use_bias=False, **kw)(y)
            y = nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(y, training=training))
            y = nn.Conv2D(self.filters, 3, padding="same", use_bias=False, **kw)(y)
        # per example: the branch is dropped, or kept and scaled by 1 / (1 - drop_path) (Keras'
        # StochasticDepth; at inference the branch is used as is)
        y = nn.Dropout(self.drop_path, noise_shape=(None, 1, 1, 1))(y, training=training)
        return y + shortcut


@register("resnet", traceable=("weight_decay", "head_dropout", "drop_path_rate"))
class ResNet(Classifier):
    """Stem conv (stride 2, optionally BN-ReLU-maxpool 3x3/2) then stages of residual modules; the first module of every stage
    after the first downsamples with stride 2; global average pooling; Dense logits."""

    stem_filters: int = 32  # filters of the strided stem convolution
    stem_kernel: int = 5  # kernel size of the stem convolution
    stem_pool: bool = False  # 3x3/2 max-pool after the stem
    stage_filters: Sequence[int] = (64, 128, 256)  # output filters of each stage
    stage_depths: Sequence[int] = (2, 2, 2)  # residual blocks per stage
    bottleneck: bool = True  # bottleneck blocks (1x1-3x3-1x1); False: basic (3x3-3x3)
    drop_path_rate: float = 0.0  # stochastic depth: the last block's drop rate, linear from 0 over the blocks

    @flax_nn.compact
    def __call__(self, x: jax.Array, training: bool = False) -> jax.Array:
        if len(self.stage_filters) != len(self.stage_depths):
            raise ValueError(
                f"stage_filters={tuple(self.stage_filters)} and stage_depths="
                f"{tuple(self.stage_depths)} must have the same length."
            )
        kw = self.conv_kwargs()
        x = nn.Conv2D(self.stem_filters, self.stem_kernel, strides=2, padding="same", use_bias=False, **kw)(x)
        if self.stem_pool:
            x = nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(x, training=training))
            x = nn.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(x)
        blocks = sum(self.stage_depths)
        index = 0
        for stage, (filters, depth) in enumerate(zip(self.stage_filters, self.stage_depths)):
            for block in range(depth):
                strides = 2 if (block == 0 and stage > 0) else 1
                drop = self.drop_path_rate * index / max(blocks - 1, 1)
                x = ResidualModule(filters, strides, self.bottleneck, kw, drop)(x, training=training)
                index += 1
        x = nn.Activation("relu")(nn.BatchNormalization(axis=channel_axis())(x, training=training))
        return self.pooled_head(x, training)
