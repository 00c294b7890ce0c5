"""The model registry: names -> Flax module classes, with the fields each lets be traced."""

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
