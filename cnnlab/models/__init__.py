"""Models by name, built only from `cnnlab.nn` layers.

>>> from cnnlab import models
>>> model = models.get_model("stridednet", num_classes=4)

Every model maps ``[N, H, W, 3]`` float images to ``[N, num_classes]`` logits (the softmax of
the Keras models lives in the loss), takes ``training: bool`` and uses the ``"dropout"`` PRNG
stream and the ``"batch_stats"`` collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cnnlab.models.inception import InceptionNet
from cnnlab.models.resnet import ResNet
from cnnlab.models.simple_cnn import SimpleCNN
from cnnlab.models.stridednet import StridedNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "stridednet": StridedNet,
    "simple_cnn": SimpleCNN,
    "resnet": ResNet,
    "inception": InceptionNet,
}


def model_fields(name: str) -> set[str]:
    """The constructor arguments of the model registered as ``name``."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(MODELS))}.")
    return {f.name for f in dataclasses.fields(MODELS[name])} - {"parent", "name"}


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name`` with keyword arguments from the config."""
    fields = model_fields(name)
    cls = MODELS[name]
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"Model {name!r} has no argument(s) {unknown}. Its arguments: {sorted(fields)}."
        )
    return cls(**kwargs)


__all__ = ["MODELS", "model_fields", "InceptionNet", "ResNet", "SimpleCNN", "StridedNet", "get_model"]
