"""Package-wide defaults, named after their Keras counterparts, and XLA:CPU's settings.

The only global state in cnnlab: the default image data format used when a layer or
function receives ``data_format=None``. It starts as ``"channels_last"`` and can be
changed with :func:`set_image_data_format` or the ``CNNLAB_IMAGE_DATA_FORMAT``
environment variable (read once, at import); :func:`image_data_format_scope` sets it for the
code inside (a run builds and traces its model in its config's ``image_data_format``).

:func:`configure_xla_cpu` chooses XLA:CPU's convolution kernels before JAX starts its CPU
backend, and :func:`configure_malloc` tells glibc's malloc to keep freed memory; neither runs
at ``import cnnlab``: :func:`cnnlab.runtime.configure` calls both (the commands do).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from importlib import metadata

_VALID_DATA_FORMATS = ("channels_last", "channels_first")


def _check_data_format(value: str) -> str:
    fmt = str(value).lower()
    if fmt not in _VALID_DATA_FORMATS:
        raise ValueError(
            f"Invalid data_format {value!r}: expected one of {_VALID_DATA_FORMATS} (or None "
            "for the package default)."
        )
    return fmt


_IMAGE_DATA_FORMAT = _check_data_format(os.environ.get("CNNLAB_IMAGE_DATA_FORMAT", "channels_last"))


_SCOPED_DATA_FORMAT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "image_data_format", default=None)


def image_data_format() -> str:
    """Returns the default data format: ``"channels_last"`` or ``"channels_first"``."""
    return _SCOPED_DATA_FORMAT.get() or _IMAGE_DATA_FORMAT


@contextlib.contextmanager
def image_data_format_scope(data_format: str) -> Iterator[None]:
    """The default data format is ``data_format`` for the code inside (this thread/context)."""
    token = _SCOPED_DATA_FORMAT.set(_check_data_format(data_format))
    try:
        yield
    finally:
        _SCOPED_DATA_FORMAT.reset(token)


def channel_axis() -> int:
    """The channel axis of a 4-D image batch in the default data format (-1 or 1), for models
    that normalize or concatenate over channels."""
    return 1 if image_data_format() == "channels_first" else -1


def set_image_data_format(data_format: str) -> None:
    """Sets the default data format used where ``data_format=None``."""
    global _IMAGE_DATA_FORMAT
    _IMAGE_DATA_FORMAT = _check_data_format(data_format)


def standardize_data_format(data_format: str | None) -> str:
    """Resolves ``None`` to the package default and validates the value (case-insensitive)."""
    if data_format is None:
        return image_data_format()
    return _check_data_format(data_format)


def epsilon() -> float:
    """Keras' fuzz factor (1e-7), used by constraints and some activations."""
    return 1e-7


# --------------------------------------------------------------------------- XLA:CPU

#: ``eigen`` (cnnlab's default) or ``ynnpack`` (XLA's own default on jaxlib >= 0.10).
CPU_CONVOLUTIONS_ENV = "CNNLAB_CPU_CONVOLUTIONS"
CPU_CONVOLUTIONS = ("eigen", "ynnpack")
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
#: Keeps XLA's other YNNPACK fusions (dots, reductions) and takes its convolutions out of
#: them, so that they run on XLA's Eigen kernels: on CPU their kernel gradients are several
#: times faster there (experiments/bench/README.md measures both).
EIGEN_CONVOLUTIONS_FLAG = f"{_YNN_FLAG}=-individual_convolution"


def _jaxlib_has_ynnpack() -> bool:
    # An XLA flag this jaxlib does not know aborts the process, so the flag is only set on the
    # versions it was measured on.
    try:
        major, minor = (int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (0, 10)


def _cpu_backend_started() -> bool:
    """Whether JAX already runs on a CPU backend (JAX's one private name cnnlab reads)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started()) and sys.modules["jax"].default_backend() == "cpu"


def configure_xla_cpu(environ: dict[str, str] | None = None) -> str:
    """Chooses XLA:CPU's convolution kernels before JAX starts its backend; returns the choice.

    ``CNNLAB_CPU_CONVOLUTIONS=eigen`` (the default) adds :data:`EIGEN_CONVOLUTIONS_FLAG` to
    ``XLA_FLAGS``; ``ynnpack`` leaves XLA's default. A ``XLA_FLAGS`` that already sets
    ``--xla_cpu_experimental_ynn_fusion_type`` is the user's choice and is left as it is
    (``"user"``); so is a jaxlib older than 0.10 (``"xla-default"``). Only CPU programs are
    affected. When JAX's backend has started already, the flag can no longer apply: a warning
    says so, ``XLA_FLAGS`` is left as the backend read it, and the mode is ``"too-late"``.
    """
    env = os.environ if environ is None else environ
    mode = env.get(CPU_CONVOLUTIONS_ENV, "eigen").strip().lower() or "eigen"
    if mode not in CPU_CONVOLUTIONS:
        raise ValueError(f"{CPU_CONVOLUTIONS_ENV}={mode!r}: must be one of {', '.join(CPU_CONVOLUTIONS)}")
    flags = env.get("XLA_FLAGS", "")
    if _YNN_FLAG in flags:
        return "user"
    if mode == "ynnpack":
        return mode
    if not _jaxlib_has_ynnpack():
        return "xla-default"
    if _cpu_backend_started():  # the flag could no longer apply: XLA_FLAGS keeps saying what runs
        warnings.warn(
            "cnnlab.runtime.configure() was called after JAX started its backend, so XLA:CPU keeps "
            "its YNNPACK convolutions (slower training on CPU): call it before running JAX code, or "
            f"set XLA_FLAGS={EIGEN_CONVOLUTIONS_FLAG}", stacklevel=3)
        return "too-late"
    env["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS_FLAG}".strip()
    return mode


MALLOC_ENV = "CNNLAB_MALLOC"
#: The modes of :func:`configure_malloc`.
MALLOC_MODES = ("retain", "system")
# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def configure_malloc(environ: dict[str, str] | None = None) -> str:
    """Makes glibc's malloc keep the memory a process frees, for reuse; returns the mode.

    XLA:CPU allocates each program call's temporary buffers afresh (75 MB per StridedNet step at
    batch 32). glibc serves blocks over 32 MB with ``mmap`` and gives them back on ``free``, so
    every call touches fresh pages: about 18,000 page faults per step, a fifth of the step on 2
    cores. ``retain`` (the default) sets, with ``mallopt``, one arena for all threads, no
    ``mmap``-served blocks and no trimming of the heap's top, so the next call reuses the same
    pages; the process then holds its peak memory until it exits. ``CNNLAB_MALLOC=system``
    leaves malloc alone; so does a ``GLIBC_TUNABLES`` that sets any ``glibc.malloc`` tunable
    (``"user"``), and a C library other than glibc (``"not glibc"``). Call it before threads
    that allocate start (``import cnnlab`` does, before JAX).
    """
    env = os.environ if environ is None else environ
    mode = env.get(MALLOC_ENV, "retain").strip().lower() or "retain"
    if mode not in MALLOC_MODES:
        raise ValueError(f"{MALLOC_ENV}={mode!r}: must be one of {', '.join(MALLOC_MODES)}")
    if mode == "system":
        return mode
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "user"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return "retain" if all(mallopt(param, value) == 1 for param, value in settings) else "system"
