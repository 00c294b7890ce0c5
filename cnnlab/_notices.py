"""Messages said once per process on stderr: fallbacks (why a faster path is not used) and
automatic choices (what ``"auto"`` settled on). No imports from cnnlab: every layer uses it."""

from __future__ import annotations

import sys

_said: dict[str, str] = {}  # message -> topic


def say_once(message: str, *, topic: str, prefix: str = "cnnlab: ", show: bool = True) -> None:
    """Prints ``prefix + message`` to stderr the first time this process says it (``show``:
    False keeps it quiet, e.g. on the processes of a multi-process run that do not log), and
    remembers it under ``topic``."""
    if message in _said:
        return
    _said[message] = topic
    if show:
        print(f"{prefix}{message}", file=sys.stderr, flush=True)


def said(topic: str) -> list[str]:
    """Every message of ``topic`` this process said, sorted."""
    return sorted(m for m, t in _said.items() if t == topic)
