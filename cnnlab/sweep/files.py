"""Config files in and out: load a sweep file's ``get_config``/``get_sweep``, write a runnable
config file for any resolved config (each trial's ``config.py``, the best trial's)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import ml_collections

from cnnlab.schema import flatten
from cnnlab.train.config import default_config
from cnnlab.train.writers import write_text_atomic


def load_module(path: str) -> Any:
    """Imports a config file by path (``configs/sweeps/x.py``, optionally ``x.py:arg``)."""
    path = path.split(":", 1)[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    name = "cnnlab_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def config_from_file(path: str, *, relative_to: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file; ``relative_to=__file__`` resolves ``path`` beside the
    calling file (sweep files build on ``configs/smoke.py`` or ``configs/stridednet.py``)."""
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    return load_module(path).get_config()


def load_sweep_file(path: str):
    """``get_sweep()`` of a sweep file; a clear error when it has none. ``x.py:arg`` calls
    ``get_sweep("arg")``, as ml_collections calls ``get_config("arg")`` for the same flag value."""
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(
            f"{path!r} has no get_sweep(): a sweep file defines get_config() (the base config) "
            "and get_sweep() (a cnnlab.sweep.Sweep)."
        )
    args = path.split(":", 1)[1:]
    try:
        return module.get_sweep(*args)
    except (TypeError, ValueError) as e:
        if not args:
            raise
        from cnnlab.schema import ConfigError  # the argument after the colon is the user's

        raise ConfigError(f"{path!r}: get_sweep({args[0]!r}) refused its argument: {e}") from e


def config_source(config: ml_collections.ConfigDict, *, docstring: str) -> str:
    """Python source of a config file that rebuilds ``config`` from ``default_config()``, one
    assignment per field that differs from the default."""
    defaults = flatten(default_config())
    lines = [f'"""{docstring.strip()}\n"""', "", "from cnnlab.train import default_config", "", "",
             "def get_config():", "    config = default_config()"]
    for key, value in flatten(config).items():
        if key.startswith("model.kwargs."):  # every model kwarg: the model's defaults are not here
            lines.append(f"    config.model.kwargs[{key.split('.', 2)[2]!r}] = {value!r}")
        elif key not in defaults:
            parent, leaf = key.rsplit(".", 1)
            lines.append(f"    config.{parent}[{leaf!r}] = {value!r}")
        elif defaults[key] != value:
            lines.append(f"    config.{key} = {value!r}")
    lines.append("    return config")
    return "\n".join(lines) + "\n"


def write_config_file(config: ml_collections.ConfigDict, path: str, *, docstring: str) -> None:
    """Writes :func:`config_source` to ``path`` atomically."""
    write_text_atomic(path, config_source(config, docstring=docstring))
