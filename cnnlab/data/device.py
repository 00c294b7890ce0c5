"""Putting host batches on devices: batch-axis sharding and background prefetch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices: Any = None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) with axis ``axis_name``."""
    devs = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    return Mesh(devs, (axis_name,))


def batch_sharding(mesh: Mesh | None = None, axis_name: str = "data") -> NamedSharding:
    """Sharding that splits the leading (batch) axis over ``axis_name`` of ``mesh``."""
    mesh = data_mesh(axis_name=axis_name) if mesh is None else mesh
    return NamedSharding(mesh, PartitionSpec(axis_name))


def shard_batch(batch: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Puts every array of a (nested) host batch on devices, split along axis 0.

    ``sharding`` defaults to :func:`batch_sharding` over all devices. In a multi-process run
    each process passes its local slice and gets the global array
    (``jax.make_array_from_process_local_data``). The batch size must divide evenly.
    """
    sharding = batch_sharding() if sharding is None else sharding
    multi = jax.process_count() > 1

    def put(x):
        x = np.asarray(x)
        if isinstance(sharding, NamedSharding) and sharding.spec and sharding.spec[0] is not None:
            axes = sharding.spec[0]
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = int(np.prod([sharding.mesh.shape[a] for a in axes]))
            n_local = n // jax.process_count() if multi else n
            if x.shape[0] % max(n_local, 1):
                raise ValueError(
                    f"batch axis of size {x.shape[0]} does not split over {n_local} devices"
                )
        if multi:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, batch)


_END = object()


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch_to_device(
    iterator: Iterable[Any], size: int = 2, sharding: jax.sharding.Sharding | None = None
) -> Iterator[Any]:
    """Wraps a host-batch iterator: a background thread keeps ``size`` batches already on
    devices (via :func:`shard_batch`), so host-to-device transfers overlap compute.

    Exceptions from the source iterator are re-raised in the consumer. Closing the returned
    generator (or dropping it) stops the thread after its current batch.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in iterator:
                if not put(shard_batch(batch, sharding)):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            put(_Error(e))

    thread = threading.Thread(target=produce, name="cnnlab-prefetch", daemon=True)
    thread.start()

    def consume() -> Iterator[Any]:
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Error):
                    raise item.exc
                yield item
        finally:
            stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break

    return consume()
