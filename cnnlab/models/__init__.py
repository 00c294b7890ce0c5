"""Models by name, built only from `cnnlab.nn` layers.

>>> from cnnlab import models
>>> model = models.get_model("stridednet", num_classes=4)

Every model maps ``[N, H, W, 3]`` float images to ``[N, num_classes]`` logits (the softmax of
the Keras models lives in the loss), takes ``training: bool`` and uses the ``"dropout"`` PRNG
stream and the ``"batch_stats"`` collection. A user adds one from their own module (imported by
their config file) with ``@cnnlab.models.register("my_net", traceable=(...))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import flax.linen as nn

from cnnlab._registry import Registry

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])

MODELS = Registry("model", {})
_TRACEABLE: dict[str, tuple[str, ...]] = {}


def register(name: str, *, traceable: Sequence[str] = ()) -> Callable[[ModuleT], ModuleT]:
    """Decorator registering a Flax module class as model ``name``.

    ``traceable`` names its fields that accept traced values (e.g. ``weight_decay`` through
    :func:`cnnlab.nn.l2_or_none`, dropout rates through :class:`cnnlab.nn.Dropout`): the
    hyperparameters packed sweep trials may differ in.
    """

    def decorator(cls: ModuleT) -> ModuleT:
        fields = _fields(cls)
        unknown = sorted(set(traceable) - fields)
        if unknown:
            raise ValueError(
                f"Model {name!r} declares traceable field(s) {unknown} it does not have. "
                f"Its fields: {sorted(fields)}."
            )
        MODELS.register(name, cls)
        _TRACEABLE[name] = tuple(traceable)
        return cls

    return decorator


def _fields(cls: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def model_fields(name: str) -> set[str]:
    """The constructor arguments of the model registered as ``name``."""
    return _fields(MODELS.lookup(name))


def traceable_fields(name: str) -> tuple[str, ...]:
    """The fields of model ``name`` that accept traced values (see :func:`register`)."""
    MODELS.lookup(name)  # an unknown name lists the known ones
    return _TRACEABLE.get(name, ())


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name`` with keyword arguments from the config."""
    fields = model_fields(name)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"Model {name!r} has no argument(s) {unknown}. Its arguments: {sorted(fields)}."
        )
    return MODELS[name](**kwargs)


# The built-in models register themselves on import (after `register` exists).
from cnnlab.models.inception import InceptionNet  # noqa: E402
from cnnlab.models.resnet import ResNet  # noqa: E402
from cnnlab.models.simple_cnn import SimpleCNN  # noqa: E402
from cnnlab.models.stridednet import StridedNet  # noqa: E402

__all__ = ["MODELS", "InceptionNet", "ResNet", "SimpleCNN", "StridedNet", "get_model", "model_fields",
           "register", "traceable_fields"]
