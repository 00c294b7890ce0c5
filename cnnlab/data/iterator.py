"""Epoch iterators over in-memory (or memory-mapped) arrays.

Batches are dicts ``{"image": uint8 [B, H, W, 3], "label": int32 [B], "mask": bool [B]}``.
The order of an epoch is a deterministic function of ``(seed, epoch)``; an epoch can be
resumed at any step without touching the earlier batches (the permutation is computed, then
sliced). Training iterators drop the last partial batch; evaluation iterators pad it to the
full batch size (zero images, label 0) with ``mask=False`` on the padding, so that every image
is seen exactly once and all batches share one shape (one compilation).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in one epoch."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of ``epoch``: ``np.random.default_rng([seed, epoch]).permutation(n)``
    (or ``arange(n)`` without shuffling)."""
    if not shuffle:
        return np.arange(num_examples)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _take(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    # Contiguous ranges are sliced (cheap for memory maps); others are gathered.
    if idx.size and idx[-1] - idx[0] == idx.size - 1 and np.all(np.diff(idx) == 1):
        return np.asarray(arr[idx[0] : idx[-1] + 1])
    return np.asarray(arr[idx])


def iterate_epoch(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    drop_remainder: bool = True,
) -> Iterator[Batch]:
    """Yields the batches of one epoch, starting at batch ``start_step``.

    ``drop_remainder=True`` (training) yields only full batches; ``False`` (evaluation) pads
    the final batch and marks the padding with ``mask=False``.
    """
    n = int(labels.shape[0])
    if images.shape[0] != n:
        raise ValueError(f"images ({images.shape[0]}) and labels ({n}) differ in length")
    steps = num_batches(n, batch_size, drop_remainder)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}]")
    order = epoch_order(n, seed, epoch, shuffle)
    for step in range(start_step, steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        image = _take(images, idx)
        label = np.asarray(labels[idx], dtype=np.int32)
        mask = np.ones((batch_size,), dtype=bool)
        k = idx.size
        if k < batch_size:
            image = np.concatenate([image, np.zeros((batch_size - k, *image.shape[1:]), image.dtype)])
            label = np.concatenate([label, np.zeros((batch_size - k,), np.int32)])
            mask[k:] = False
        yield {"image": image, "label": label, "mask": mask}


def iterate_train(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    num_epochs: int | None = None,
) -> Iterator[Batch]:
    """Endless (or ``num_epochs``-long) training stream from global step ``start_step``.

    Global step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, with
    :func:`iterate_epoch`'s shuffling and ``drop_remainder=True``; so a run restarted at step
    ``s`` sees exactly the batches an uninterrupted run would.
    """
    steps = num_batches(int(labels.shape[0]), batch_size, True)
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {labels.shape[0]} training examples")
    epoch, step = divmod(int(start_step), steps)
    while num_epochs is None or epoch < num_epochs:
        yield from iterate_epoch(images, labels, batch_size, seed=seed, epoch=epoch, start_step=step)
        epoch, step = epoch + 1, 0
