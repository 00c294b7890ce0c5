"""Multi-host set-up on JAX's own distributed runtime (``jax.distributed``).

One code path for one device, many local devices and many processes: a 1-D ``Mesh`` over every
device of every process with a ``data`` axis; each process feeds its own slice of every global
batch; only process 0 writes logs and reports.
"""

from __future__ import annotations

import os

import jax

_ENV = {
    "coordinator_address": ("CNNLAB_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("CNNLAB_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("CNNLAB_PROCESS_ID", "JAX_PROCESS_ID"),
}


def _from_env(name: str) -> str | None:
    for var in _ENV[name]:
        if os.environ.get(var):
            return os.environ[var]
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process run when an address and more than one process are given (as
    arguments or through ``CNNLAB_*``/``JAX_*`` environment variables). Must run before any
    other JAX call. On CPU it selects the gloo collectives. Returns whether it initialized."""
    address = coordinator_address or _from_env("coordinator_address")
    n = num_processes if num_processes is not None else _from_env("num_processes")
    pid = process_id if process_id is not None else _from_env("process_id")
    if not address or n is None or int(n) <= 1:
        return False
    if pid is None:
        raise ValueError(
            f"A multi-process run ({n} processes at {address}) needs a process id: pass "
            "--process_id or set CNNLAB_PROCESS_ID."
        )
    if not 0 <= int(pid) < int(n):
        raise ValueError(f"process_id={pid} must be in [0, {n}).")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=int(n), process_id=int(pid))
    return True


def _has_accelerator() -> bool:
    # Checking devices would initialize the backend before jax.distributed; look at the
    # environment instead: an explicit platform list, or an installed CUDA/TPU plugin.
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return not platforms.startswith("cpu")
    import importlib.util

    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
    )


def is_main_process() -> bool:
    """True on the process that writes logs, metrics and reports."""
    return jax.process_index() == 0


def process_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch (processes split it evenly, in order)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {n} processes."
        )
    local = global_batch_size // n
    start = jax.process_index() * local
    return slice(start, start + local)
