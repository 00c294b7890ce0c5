"""One config schema: each field declared once, with default, type, check and a one-line doc.

A schema is a nested dict of sections whose leaves are :class:`Field`\\ s. From it come the
default ``ml_collections.ConfigDict`` (:func:`default_config`), validation into a plain dict
(:func:`resolve`, raising :class:`ConfigError`), and the field documentation
(:func:`field_docs`). Every error has one format, naming the key and the bad value::

    config key 'optimizer.learning_rate': invalid value -1.0 (must be > 0)
    unknown config key 'optimzer' (did you mean 'optimizer'?)

No JAX, no Flax: the training config, the data config and sweeps all use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

Check = Callable[[Any], "str | None"]


class ConfigError(ValueError):
    """A config key that does not exist or holds a bad value (the message names both)."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: ``default`` (``None``: optional, a typed placeholder in the ConfigDict
    so the command line can still set it); ``type_`` (an int passes for a float, a list for a
    tuple, a bool never for a number; ``dict`` is an open group checked by the caller);
    ``check(value)`` returning ``None`` or the reason (``"must be > 0"``); a one-line ``doc``;
    ``choices`` (values, or a function returning them, e.g. a registry looked up at validation
    time; applied to each item of a tuple); ``convert`` normalizing a valid value; ``traceable``:
    a float value may be a traced scalar, so trials packed into one program can differ in it;
    ``affects_results``: False for a field that changes how a run goes but not what it computes
    (a progress bar, a data path whose images the split record checks). These two flags are the
    one source for what a resume may change silently, what packed trials may differ in, and
    what a sweep's fingerprint ignores. ``legacy``: for a field added after runs were recorded
    without it, the value those runs computed with where it differs from ``default`` (a run whose
    ``config.json`` lacks the field resumes with it: :func:`legacy_values`)."""

    default: Any
    type_: type | tuple[type, ...]
    check: Check | None = None
    doc: str = ""
    choices: Iterable[Any] | Callable[[], Iterable[Any]] | None = None
    convert: Callable[[Any], Any] | None = None
    traceable: bool = False
    affects_results: bool = True
    legacy: Any = dataclasses.field(default=None, compare=False)

    def valid_choices(self) -> list[Any] | None:
        if self.choices is None:
            return None
        found = self.choices() if callable(self.choices) else self.choices
        return list(found.names() if hasattr(found, "names") else sorted(found))

    def resolve(self, path: str, value: Any) -> Any:
        """The validated (and converted) value, or :class:`ConfigError`."""
        value = _coerce(path, value, self)
        if value is None:
            return None
        choices = self.valid_choices()
        if choices is not None:
            for item in value if isinstance(value, tuple) else (value,):
                if item not in choices:
                    raise invalid(path, item, one_of(item, choices))
        problem = self.check(value) if self.check is not None else None
        if problem:
            raise invalid(path, value, problem)
        return self.convert(value) if self.convert is not None else value

    def type_name(self) -> str:
        names = "|".join("any" if t is object else t.__name__ for t in _types(self))
        return f"{names}|None" if self.default is None else names


Schema = Mapping[str, "Field | Schema"]


class Section(dict):
    """A schema group whose resolved dict is passed through ``finalize(resolved, path)``: for a
    group whose parts apply only when chosen (the parameters of the augmentation ops listed)."""

    def __init__(self, fields: Schema, finalize: Callable[[dict[str, Any], str], dict[str, Any]]):
        super().__init__(fields)
        self.finalize = finalize


def chosen_part_section(kind: str, shared: Mapping[str, Field],
                        parts: Mapping[str, Mapping[str, Field]]) -> Section:
    """A section for a component chosen by name among registered parts, each owning its fields:
    ``shared`` (with the ``name`` field) at the top, then one sub-section per part that has
    fields (``<kind>.<part>.<field>``). Resolved, only the chosen part's sub-section is kept (a
    run records what it uses); a field changed for a part not chosen has no effect and is
    warned about; a chosen part's field whose default is ``None`` is required."""
    reserved = sorted(set(shared) & set(parts))
    if reserved:
        raise ValueError(f"{kind} name(s) {reserved} clash with the section's own fields")
    fields = {**shared, **{name: dict(p) for name, p in parts.items() if p}}

    def chosen_only(resolved: dict[str, Any], path: str) -> dict[str, Any]:
        chosen = resolved["name"]
        for part, values in resolved.items():
            if part in shared or part == chosen or not isinstance(values, dict):
                continue
            changed = sorted(f for f, v in values.items() if v != parts[part][f].default)
            if changed:
                warnings.warn(f"{path}.{part}.{', '.join(changed)} set, but {path}.name is "
                              f"{chosen!r}: no effect", UserWarning, stacklevel=2)
        for name, field in parts.get(chosen, {}).items():  # a field without default is required
            if field.default is None and resolved.get(chosen, {}).get(name) is None:
                raise ConfigError(f"config key '{path}.{chosen}.{name}': required when {path}.name "
                                  f"is {chosen!r} ({field.doc})")
        return {k: v for k, v in resolved.items() if k in shared or k == chosen}

    return Section(fields, chosen_only)


def traceable_names(fields: Mapping[str, Field]) -> tuple[str, ...]:
    """The names of the ``traceable`` fields, in declaration order."""
    return tuple(name for name, f in fields.items() if f.traceable)


def part_values(section: Any, part: str, fields: Mapping[str, Field]) -> dict[str, Any]:
    """The values of ``part``'s ``fields`` in a (validated) chosen-part section, defaults
    filled in."""
    values = section.get(part) if hasattr(section, "get") else None
    values = dict(values) if values else {}
    return {f: values.get(f, field.default) for f, field in fields.items()}


# --------------------------------------------------------------------------- errors


def closest(word: Any, choices: Iterable[Any]) -> Any | None:
    """The choice most similar to ``word`` (``difflib``), or ``None``."""
    by_text = {str(c): c for c in choices}
    match = difflib.get_close_matches(str(word), list(by_text), n=1, cutoff=0.6)
    return by_text[match[0]] if match else None


def invalid(path: str, value: Any, reason: str) -> ConfigError:
    return ConfigError(f"config key {path!r}: invalid value {value!r} ({reason})")


def unknown(path: str, valid_paths: Iterable[str], deeper: Iterable[str] = ()) -> ConfigError:
    """Matched on the last part of the key (a shared prefix does not make everything close),
    among ``valid_paths`` first, then among ``deeper`` ones (a field that moved into a group)."""
    valid_paths = list(valid_paths)
    name = path.rsplit(".", 1)[-1]
    for candidates in (valid_paths, deeper):
        by_name: dict[str, str] = {}
        for p in candidates:  # the first declared, where several sections share a field name
            by_name.setdefault(p.rsplit(".", 1)[-1], p)
        match = closest(name, by_name)
        if match:
            return ConfigError(f"unknown config key {path!r} (did you mean {by_name[match]!r}?)")
    return ConfigError(f"unknown config key {path!r} (valid keys here: {', '.join(valid_paths)})")


def one_of(value: Any, choices: list[Any]) -> str:
    """``"must be one of a, b; did you mean 'a'?"``."""
    match = closest(value, choices)
    listed = ", ".join(map(str, choices)) or "nothing registered"
    return f"must be one of {listed}" + (f"; did you mean {match!r}?" if match else "")


# --------------------------------------------------------------------------- checks


def greater_than(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}"


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def in_range(lo: float, hi: float, *, hi_open: bool = True) -> Check:
    """``lo <= v < hi`` (``<= hi`` with ``hi_open=False``)."""
    def check(v):
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}"
    return check


# --------------------------------------------------------------------------- derived


def _types(field: Field) -> tuple[type, ...]:
    return field.type_ if isinstance(field.type_, tuple) else (field.type_,)


def _coerce(path: str, value: Any, field: Field) -> Any:
    types = _types(field)
    if value is None:
        if field.default is None:
            return None
        raise invalid(path, value, f"must be {field.type_name()}")
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, list) and tuple in types:
        value = tuple(value)
    if isinstance(value, int) and not isinstance(value, bool) and float in types and int not in types:
        value = float(value)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise invalid(path, value, f"must be {field.type_name()}")
    return dict(value) if isinstance(value, Mapping) else value


def to_plain(config: Any) -> dict[str, Any]:
    """A plain nested dict of a ConfigDict, a mapping or ``None``."""
    if config is None:
        return {}
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {k: to_plain(v) if isinstance(v, (Mapping, ml_collections.ConfigDict)) else v
                for k, v in config.items()}
    raise ConfigError(f"a config must be a ConfigDict or a dict, got {type(config).__name__}")


def default_config(schema: Schema) -> ml_collections.ConfigDict:
    """The schema's defaults as a ConfigDict (``None`` defaults as typed placeholders, so
    ``--config.<key>=...`` can set them)."""
    c = ml_collections.ConfigDict()
    for key, node in schema.items():
        if not isinstance(node, Field):
            c[key] = default_config(node)
        elif node.default is None:
            c[key] = config_dict.placeholder(_types(node)[0])
        elif isinstance(node.default, Mapping):
            c[key] = ml_collections.ConfigDict(dict(node.default))
        elif {bool, str} <= set(_types(node)):
            # e.g. True, False or "auto": a reference of any type, so that a config file may
            # assign either and the command line's value is parsed as a literal.
            c[key] = config_dict.FieldReference(node.default, field_type=object)
        else:
            c[key] = node.default
    return c


def resolve(schema: Schema, config: Any, *, prefix: str = "") -> dict[str, Any]:
    """``config`` validated against ``schema`` as a plain dict, missing keys at their defaults.

    Raises:
      ConfigError: an unknown key (with the closest valid one) or a bad value.
    """
    plain = to_plain(config)
    for key in plain:
        if key not in schema:
            deeper = [p for p in _leaves(schema, prefix) if p.count(".") > prefix.count(".")]
            raise unknown(prefix + key, [prefix + k for k in schema], deeper)
    out: dict[str, Any] = {}
    for key, node in schema.items():
        path = prefix + key
        if isinstance(node, Field):
            out[key] = node.resolve(path, plain.get(key, node.default))
        else:
            sub = plain.get(key, {})
            if not isinstance(sub, Mapping):
                raise invalid(path, sub, "must be a group of fields")
            out[key] = resolve(node, sub, prefix=path + ".")
    return schema.finalize(out, prefix.rstrip(".")) if isinstance(schema, Section) else out


def keys_without_effect(schema: Schema, prefix: str = "") -> tuple[str, ...]:
    """The flattened keys of the fields declared ``affects_results=False``."""
    out: list[str] = []
    for key, node in schema.items():
        if isinstance(node, Field):
            out += [prefix + key] if not node.affects_results else []
        else:
            out += keys_without_effect(node, f"{prefix}{key}.")
    return tuple(out)


def legacy_values(schema: Schema, prefix: str = "") -> dict[str, Any]:
    """``{flattened key: legacy value}`` of the fields that declare one (``Field.legacy``)."""
    out: dict[str, Any] = {}
    for key, node in schema.items():
        if isinstance(node, Field):
            out.update({prefix + key: node.legacy} if node.legacy is not None else {})
        else:
            out.update(legacy_values(node, f"{prefix}{key}."))
    return out


def _leaves(schema: Schema, prefix: str) -> list[str]:
    out: list[str] = []
    for key, node in schema.items():
        out += [prefix + key] if isinstance(node, Field) else _leaves(node, f"{prefix}{key}.")
    return out


def field_docs(schema: Schema, *, prefix: str = "") -> list[str]:
    """One ``key (type, default): doc`` line per field, in declaration order."""
    lines = []
    for key, node in schema.items():
        if not isinstance(node, Field):
            lines += field_docs(node, prefix=f"{prefix}{key}.")
            continue
        choices = node.valid_choices()
        extra = f" [{' | '.join(map(str, choices))}]" if choices is not None else ""
        traced = " (traceable)" if node.traceable else ""
        lines.append(f"{prefix}{key} ({node.type_name()}, {node.default!r}): {node.doc}{extra}{traced}")
    return lines


def copy_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """An unlocked deep copy (flag-loaded configs are locked)."""
    return ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.learning_rate": 1e-3, ...}`` for every leaf of a (nested) config."""
    plain = config.to_dict() if hasattr(config, "to_dict") else config
    out: dict[str, Any] = {}
    for k, v in plain.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
