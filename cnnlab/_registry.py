"""Keras-style identifier resolution shared by activations, initializers, regularizers and
constraints.

Keras lets a layer argument such as ``kernel_initializer`` be ``None``, a registered name
(``"he_normal"``, ``"HeNormal"``), a serialized config ``{"class_name": ..., "config": {...}}``,
an object, a class, or a plain callable. :class:`Registry` implements that resolution once, with
one error format: an unknown name raises ``ValueError`` naming the bad value and listing every
valid name.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

# ``class_name`` Keras 3 writes when it serializes a plain function (the name is in "config").
_FUNCTION_CLASS_NAME = "function"
_MISSING = object()


class UnknownNameError(ValueError, KeyError):
    """A name no registry entry has: a ``ValueError`` for users, a ``KeyError`` for mapping code."""

    __str__ = ValueError.__str__


class Registry:
    """A name -> object table (functions or classes) with Keras' ``get`` semantics; read as a
    mapping too (``name in r``, ``r[name]``, ``sorted(r)``, ``len(r)``).

    Args:
        kind: what the table holds, used in error messages ("activation", "initializer", ...).
        entries: name -> object; several names may map to one object (aliases).
    """

    def __init__(self, kind: str, entries: Mapping[str, Any]) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = dict(entries)
        self._modules: dict[str, str | None] = {k: getattr(v, "__module__", None) for k, v in entries.items()}

    def register(self, name: str, obj: Any = _MISSING, *, module: str | None = None) -> Any:
        """Adds ``obj`` under ``name``; without ``obj``, a decorator that adds what it decorates.

        The extension point for users: ``@REGISTRY.register("my_thing")`` in their own module,
        imported by their config file. Re-registering a name replaces the entry (so a module
        reloaded in a notebook does not fail). ``module`` names where the entry was defined
        (default: the object's ``__module__``), so a run can re-import a user's module.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        if obj is not _MISSING:
            self._entries[name] = obj
            self._modules[name] = module or getattr(obj, "__module__", None)
            return obj

        def decorator(target: Any) -> Any:
            return self.register(name, target, module=module)

        return decorator

    def module_of(self, name: str) -> str | None:
        """The module that registered ``name``."""
        return self._modules.get(name)

    def items(self) -> list[tuple[str, Any]]:
        """``(name, object)`` pairs in registration order."""
        return list(self._entries.items())

    def names(self) -> tuple[str, ...]:
        """Every accepted name (aliases included), sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str) -> Any:
        """Returns the object registered under ``name`` (case-sensitive, as in Keras)."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}. Valid names are: {', '.join(self.names())}."
            ) from None

    __getitem__ = lookup

    def name_of(self, obj: Any, *, preferred: Iterable[str] = ()) -> str | None:
        """The canonical name of a registered object (first of ``preferred`` that maps to it,
        else the first name in registration order), or ``None`` if it is not registered."""
        for name in preferred:
            if self._entries.get(name, _MISSING) is obj:
                return name
        for name, value in self._entries.items():
            if value is obj:
                return name
        return None

    def get(self, identifier: Any, *, default: Any = None) -> Any:
        """Resolves ``identifier`` the way Keras' ``<module>.get`` does.

        * ``None`` -> ``default``.
        * ``str`` -> the registered object; a registered class is instantiated with defaults.
        * ``Mapping`` with ``"class_name"`` (and optional ``"config"``) -> deserialized object:
          a class is built with ``from_config(config)``; a function is returned as is, or as a
          ``functools.partial`` binding ``config`` as keyword arguments.  Keras 3's function form
          ``{"class_name": "function", "config": "<name>"}`` is accepted too.
        * a class -> an instance with default arguments.
        * any other callable (instance, function) -> returned unchanged.

        Raises:
            ValueError: unknown name (the message lists the valid names), or an identifier of an
                unsupported type.
        """
        if identifier is None:
            return default
        if isinstance(identifier, str):
            return _instantiate(self.lookup(identifier))
        if isinstance(identifier, Mapping):
            return self._from_mapping(identifier)
        if inspect.isclass(identifier):
            return identifier()
        if callable(identifier):
            return identifier
        raise ValueError(
            f"Could not interpret {self.kind} identifier {identifier!r} "
            f"(type {type(identifier).__name__}): expected None, a name, a config dict "
            f"{{'class_name': ..., 'config': {{...}}}}, or a callable. "
            f"Valid names are: {', '.join(self.names())}."
        )

    def _from_mapping(self, identifier: Mapping[str, Any]) -> Any:
        if "class_name" not in identifier:
            raise ValueError(
                f"Could not interpret {self.kind} config {dict(identifier)!r}: a config dict needs "
                "a 'class_name' key (and optionally 'config')."
            )
        class_name = identifier["class_name"]
        config = identifier.get("config")
        if class_name == _FUNCTION_CLASS_NAME and isinstance(config, str):
            # Keras 3 serializes a function as {"class_name": "function", "config": "relu", ...}.
            class_name, config = config, None
        obj = self.lookup(class_name)
        config = dict(config or {})
        if inspect.isclass(obj):
            from_config = getattr(obj, "from_config", None)
            return from_config(config) if from_config is not None else obj(**config)
        if config:
            return functools.partial(obj, **config)
        return obj


def _instantiate(obj: Any) -> Any:
    return obj() if inspect.isclass(obj) else obj


def serialize_object(obj: Any, registry: Registry) -> dict[str, Any]:
    """``{"class_name": ..., "config": obj.get_config()}`` for an object whose class is
    registered (the inverse of :meth:`Registry.get` on a config dict)."""
    cls = type(obj)
    name = registry.name_of(cls, preferred=(cls.__name__,))
    if name is None or not hasattr(obj, "get_config"):
        raise ValueError(
            f"Cannot serialize {registry.kind} {obj!r}: its class {cls.__name__} is not a "
            f"registered {registry.kind} with get_config(). "
            f"Valid names are: {', '.join(registry.names())}."
        )
    return {"class_name": name, "config": obj.get_config()}
