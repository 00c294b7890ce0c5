"""Run outputs: metrics as JSON lines plus TensorBoard events, images, and atomic JSON files.

``metrics.jsonl`` holds one record per logged step (``"kind": "train"``: the last batch's
``loss``, ``accuracy``..., ``train/<metric>`` for each metric the loss reports, the
``learning_rate`` of its update and ``images_per_sec`` since the previous log step) and per
evaluation (``"kind": "epoch"``: ``epoch``, ``train/loss`` (the epoch's mean), the loss's
``train/<metric>`` means, ``val/accuracy``, ``test/loss``...). When a run resumes from step ``s``, records
after ``s`` (written by the killed run past its last checkpoint) are dropped first, so the file
reads as one clean run. TensorBoard's points after ``s`` are purged likewise (see
:class:`MetricWriter`).

TensorBoard tags (:func:`tensorboard_tag`) keep the two kinds apart, so no tag mixes per-batch
values with epoch means: per-step values are ``step/<name>`` (``step/loss``,
``step/learning_rate``, ``step/images_per_sec``); per-epoch values keep their record key
(``train/loss``, ``val/accuracy``, ``test/loss``; the epoch number is ``epoch``). The x axis
is always the global step. Images (``augmented_batch``) go to TensorBoard's image tab and to
``<name>.png`` in the run directory.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

import numpy as np

from cnnlab import runfiles
from cnnlab._files import write_text_atomic


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a kill is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def tensorboard_tag(kind: str, key: str) -> str:
    """The TensorBoard tag of value ``key`` of a ``kind`` record: ``step/<key>`` for per-step
    (``"train"``) records, the key itself (``train/loss``, ``epoch``) for ``"epoch"`` records,
    ``<kind>/<key>`` for a bare key of any other kind."""
    if kind == "train":
        return f"step/{key}"
    return key if kind == "epoch" or "/" in key else f"{kind}/{key}"


def image_grid(images: np.ndarray, *, columns: int = 4, pad: int = 2, min_tile: int = 64) -> np.ndarray:
    """Tiles images ``[N, H, W, C]`` (any range-[0, 255] dtype) into one uint8 ``[rows * (h + pad)
    + pad, columns * (w + pad) + pad, C]`` grid on white; each image is enlarged by an integer
    factor (nearest neighbour, pixels stay exact) to at least ``min_tile`` pixels a side."""
    images = np.clip(np.rint(np.asarray(images, np.float32)), 0, 255).astype(np.uint8)
    n, h, w, c = images.shape
    scale = max(1, -(-min_tile // max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + q * (w + pad):(q + 1) * (w + pad)] = image
    return grid


class MetricWriter:
    """Appends JSON lines to ``metrics.jsonl`` and scalars and images to TensorBoard (``tb/``).

    A start at ``resume_step`` drops what an earlier start wrote after that step, which this
    one writes again: the records from ``metrics.jsonl``, and TensorBoard's points through a
    purge event in the new event file (TensorBoard then discards the earlier files' points at
    and after the purge step, in every tag). That step is ``resume_step + 1``, or 0 when
    starting from scratch: a run started over after a kill before its first checkpoint writes
    step 0 (``augmented_batch``) again. Each start's event file is numbered, as TensorBoard
    reads the files in name order and two starts within a second would otherwise share a name
    (the later one emptying the earlier).
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(workdir, runfiles.METRICS)
        self._tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        try:
            from tensorboardX import SummaryWriter

            tb_dir = os.path.join(workdir, runfiles.TENSORBOARD)
            starts = len(glob.glob(os.path.join(glob.escape(tb_dir), "events.out.tfevents.*")))
            self._tb = SummaryWriter(tb_dir, purge_step=resume_step + 1 if resume_step else 0,
                                     filename_suffix=f".{starts + 1:04d}")
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _clean({"kind": kind, "step": int(step), **values})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(tensorboard_tag(kind, key), value, step)

    def write_image(self, name: str, image: np.ndarray, step: int) -> None:
        """Writes a uint8 ``[H, W, C]`` image as ``<workdir>/<name>.png`` and as TensorBoard
        image ``name`` at ``step``."""
        if not self.enabled:
            return
        from PIL import Image

        path = os.path.join(os.path.dirname(self.path), f"{name}.png")
        tmp = path + ".tmp.png"
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        """Writes TensorBoard's buffered events to disk (the trainer calls it every epoch, so a
        killed run loses at most the current epoch's points)."""
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
