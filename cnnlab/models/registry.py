"""The model registry: names -> Flax module classes, with the fields each lets be traced."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import flax.linen as nn

from cnnlab._registry import Registry
from cnnlab.schema import Field

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


def _field_type(hint: Any) -> type | tuple[type, ...]:
    """The schema type of a dataclass field's annotation (``object``: anything)."""
    origin = typing.get_origin(hint)
    if hint in (int, float, bool, str):
        return hint
    if hint is tuple or origin in (tuple, list, collections.abc.Sequence) or hint is list:
        return tuple
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        found = tuple(t for a in parts for t in (lambda f: f if isinstance(f, tuple) else (f,))(_field_type(a)))
        return object if object in found else (found[0] if len(found) == 1 else found)
    return object


_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#=]*(?:=[^#]*)?#\s*(.+?)\s*$")


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment on its line}`` from the class's source and its bases' (a field
    documents itself with a trailing ``# ...``)."""
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not isinstance(klass, type):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            match = _COMMENT.match(line)
            if match and match.group(1) not in docs:
                docs[match.group(1)] = match.group(2)
    return docs


#: Model fields that the training config sets itself (not ``model.kwargs``).
CONFIG_SET_FIELDS = ("num_classes",)


def model_schema(name: str) -> dict[str, Field]:
    """``model.kwargs``' fields of model ``name``, derived from its dataclass fields: type (from
    the annotation), default, one-line doc (the field's trailing comment) and whether it is
    traceable; what ``cnnlab train --help`` lists and the config is checked against."""
    cls = MODELS.lookup(name)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (an annotation that cannot be resolved: untyped)
        hints = {}
    docs = _field_comments(cls)
    traceable = set(traceable_fields(name))
    # A field may declare its own check, ``dataclasses.field(..., metadata={"check": fn})`` with
    # ``fn(value) -> None or the reason``: a bad value is refused before the run records anything.
    out: dict[str, Field] = {}
    for f in dataclasses.fields(cls):
        if f.name in ("parent", "name", *CONFIG_SET_FIELDS):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        type_ = _field_type(hints.get(f.name, Any))
        if isinstance(default, list):
            default = tuple(default)
        out[f.name] = Field(default, type_, check=f.metadata.get("check"), doc=docs.get(f.name, ""),
                            traceable=f.name in traceable)
    return out


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
