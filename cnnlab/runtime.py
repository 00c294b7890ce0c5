"""The process-wide settings that make cnnlab fast on CPU, made only when asked.

``import cnnlab`` changes no process state: no environment variable, no ``mallopt``. The
``cnnlab`` commands (and their sweep workers) call :func:`configure` first thing, before JAX
starts; a library user who wants the same speed calls it once, before running any JAX code::

    import cnnlab.runtime
    cnnlab.runtime.configure()   # XLA:CPU's Eigen convolutions, malloc keeping freed memory

What it sets, and how to opt out of each part (``CNNLAB_CPU_CONVOLUTIONS=ynnpack``,
``CNNLAB_MALLOC=system``): :func:`cnnlab.backend.configure_xla_cpu` (adds a flag to
``XLA_FLAGS``, which the processes this one starts inherit) and
:func:`cnnlab.backend.configure_malloc` (the process then keeps its peak memory).
"""

from __future__ import annotations

from cnnlab import backend

_state: dict[str, str] = {}


def configure(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Chooses XLA:CPU's convolution kernels and sets up glibc's malloc for XLA's per-call
    buffers, once per process; returns ``{"cpu_convolutions": ..., "malloc": ...}`` (the modes
    of :func:`cnnlab.backend.configure_xla_cpu` and :func:`cnnlab.backend.configure_malloc`).
    ``environ``: the environment to read and change (default ``os.environ``)."""
    if not _state:
        _state["cpu_convolutions"] = backend.configure_xla_cpu(environ)
        _state["malloc"] = backend.configure_malloc(environ)
    return dict(_state)


def state() -> dict[str, str]:
    """What :func:`configure` set in this process, or ``"not configured"`` for each part."""
    return dict(_state) or {"cpu_convolutions": "not configured", "malloc": "not configured"}
