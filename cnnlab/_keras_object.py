"""Keras' configurable-object protocol, shared by initializers, constraints and regularizers."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="KerasObject")


class KerasObject:
    """``get_config()`` returns the constructor arguments; ``from_config`` and ``repr`` use it."""

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable (Keras' format)."""
        return {}

    @classmethod
    def from_config(cls: type[T], config: dict[str, Any]) -> T:
        """Rebuilds the object from :meth:`get_config`'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except NotImplementedError:
            args = ""
        return f"{type(self).__name__}({args})"


def classes_in(
    namespace: Mapping[str, Any], base: type, *, exclude: Iterable[type] = ()
) -> dict[str, type]:
    """The public subclasses of ``base`` in a module's ``namespace`` (``globals()``) under every
    public name they have there: the class name and Keras' lowercase aliases (``max_norm =
    MaxNorm``), class names first. ``base`` and ``exclude`` (abstract bases) are left out."""
    skip = {base, *exclude}
    return {
        name: obj
        for name, obj in namespace.items()
        if not name.startswith("_") and inspect.isclass(obj) and issubclass(obj, base)
        and obj not in skip
    }
