"""Inference from a run directory alone: ``load_run`` and ``cnnlab predict``.

A run records everything a prediction needs: ``config.json`` (model, image size, resize mode
and filter), ``classes.json``, the checkpoints and, for ``normalization="mean_std"``,
``preprocessing.json`` (the training images' channel statistics). No dataset is reloaded::

    run = cnnlab.load_run("runs/smoke")        # the best checkpoint (else the latest)
    probs = run.predict(images)                # [N, num_classes] float32
    run.class_names[probs.argmax(-1)[0]]

Input rule (:func:`prepare_images`): uint8 images are 0..255; float images are 0..255 too,
unless every value of the input lies in [0, 1], then they are 0..1 and scaled by 255. Either is
rounded to uint8 and resized with Pillow exactly as the data pipeline decodes files, so a float
image gives what the same uint8 image gives.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnlab.data import decode_images
from cnnlab.data._decode import resize_image, to_rgb
from cnnlab.data.config import image_hw

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------- preprocessing


def prepare_images(
    images: Any,
    *,
    image_size: int | Sequence[int],
    resize: str = "stretch",
    resample: str = "bilinear",
    pad_value: int = 0,
) -> np.ndarray:
    """Images of any size -> uint8 ``[N, height, width, 3]``, resized as the data pipeline does.

    Args:
        images: one image ``[H, W, C]`` (or ``[H, W]`` grey), a batch ``[N, H, W, C]``, or a
            list of images of different sizes; ``C`` is 1 (grey), 3 (RGB) or 4 (alpha dropped).
            uint8 (and other integers) are 0..255; float is 0..255 unless every float value
            given is in [0, 1] (then 0..1).
        image_size: the target, int or ``(height, width)`` (``config.data.image_size``).
        resize, resample, pad_value: ``config.data``'s resize mode, Pillow filter and letterbox
            colour.
    """
    from PIL import Image

    items = _image_list(images)
    floats = [a for a in items if np.issubdtype(a.dtype, np.floating)]
    scale = 255.0 if floats and all(a.min() >= 0 and a.max() <= 1 for a in floats) else 1.0
    h, w = image_hw(image_size)
    out = np.empty((len(items), h, w, 3), np.uint8)
    for i, arr in enumerate(items):
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        if arr.shape == (h, w, 3):
            out[i] = arr  # what resize_image returns for an image of the target size
            continue
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        out[i] = np.asarray(resize_image(to_rgb(im), h, w, resize, resample, pad_value))
    return out


def _image_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, (list, tuple)):
        items = [np.asarray(a) for a in images]
        bad = [i for i, a in enumerate(items) if a.ndim not in (2, 3)]
        if bad:
            raise ValueError(f"images[{bad[0]}] has shape {items[bad[0]].shape}; a list holds "
                             "images [H, W, C] or [H, W]")
    else:
        arr = np.asarray(images)
        if arr.ndim not in (2, 3, 4):
            raise ValueError(f"images of shape {arr.shape}: expected [H, W, C], [N, H, W, C] or "
                             "a list of images")
        items = list(arr) if arr.ndim == 4 else [arr]
    if not items:
        raise ValueError("no images given")
    for i, a in enumerate(items):
        if a.ndim == 2:
            items[i] = a = a[..., None]
        if a.shape[-1] not in (1, 3, 4) or 0 in a.shape:
            raise ValueError(f"image {i} has shape {a.shape}: expected [H, W, C] with C in (1, 3, 4)")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"image {i} has dtype {a.dtype}: expected uint8 or float")
    return items


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """A trained run loaded for inference (see :func:`load_run`): ``trained`` (a
    :class:`cnnlab.train.experiment.TrainedModel`) whose fields read as the run's own:
    ``model`` the Flax module, ``variables`` its ``{"params", "batch_stats"}``, ``step`` the
    checkpoint's global step, ``which`` the checkpoint (``best`` or ``latest``) it came from,
    ``workdir``, ``config`` and ``class_names``; and ``preprocessing``, what an image needs
    before the model (size, resize, normalization).
    """

    trained: Any
    preprocessing: dict[str, Any]
    _forward: Any = dataclasses.field(repr=False, default=None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "trained":  # not a field of the trained model
            raise AttributeError(name)
        return getattr(self.trained, name)

    @property
    def image_size(self) -> tuple[int, int]:
        return image_hw(self.config.data.image_size)

    def prepare(self, images: Any) -> np.ndarray:
        """:func:`prepare_images` with the run's size, resize mode and filter: uint8
        ``[N, height, width, 3]``."""
        d = self.config.data
        return prepare_images(images, image_size=self.image_size, resize=d.resize,
                              resample=d.resample, pad_value=d.pad_value)

    def predict(self, images: Any, *, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities ``[N, num_classes]`` (float32 softmax of the logits) of images
        of any size (:func:`prepare_images` says which inputs and values)."""
        x = self.prepare(images)
        batch = batch_size or int(self.config.eval_batch_size)
        # Pad to a power of two up to the batch size: few compiled shapes, little waste.
        batch = min(batch, 1 << (len(x) - 1).bit_length())
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.uint8)])
            out.append(np.asarray(self._forward(self.variables, padded))[: len(chunk)])
        return np.concatenate(out)

    def read_images(self, paths: Sequence[str], *, num_workers: int = -1) -> tuple[np.ndarray, dict[int, str]]:
        """Decodes image files as training did: ``(uint8 [M, height, width, 3] of the readable
        files in order, {index in paths: error} of the others)``."""
        d = self.config.data
        h, w = self.image_size
        images, ok, errors = decode_images(list(paths), h, w, resize=d.resize, resample=d.resample,
                                           pad_value=d.pad_value, fast_decode=d.fast_decode,
                                           num_workers=num_workers, progress=False)
        return images[ok], errors


def load_run(workdir: str, *, which: str = "best") -> Run:
    """Loads the ``best`` checkpoint of a run (the ``latest`` when it has no best) or its
    ``latest``, with its model, class names and preprocessing, from ``workdir`` alone.

    Raises:
        FileNotFoundError: ``workdir`` is not a run directory or has no checkpoint.
        ValueError: an unknown ``which``, or a ``mean_std`` run without ``preprocessing.json``.
    """
    import jax

    from cnnlab.train.experiment import load_trained, make_normalize
    from cnnlab.train.steps import eval_logits

    trained = load_trained(workdir, which=which)
    config, model = trained.config, trained.model
    normalize = make_normalize(trained.normalization)

    @jax.jit
    def forward(variables, images):
        logits = eval_logits(model, variables, normalize(images),  # older runs: no fields
                             flip=bool(config.get("eval_flip", False)), views=config.get("eval_views", "single"))
        return jax.nn.softmax(logits, axis=-1)

    preprocessing = {"image_size": list(image_hw(config.data.image_size)),
                     **{k: config.data[k] for k in ("resize", "resample", "pad_value")},
                     **trained.normalization}
    return Run(trained, preprocessing, forward)


def check_exportable_views(config: Any) -> None:
    """Exports compute what ``run.predict`` does: a run averaging test-time crops is refused."""
    views = config.get("eval_views", "single")
    if views != "single":
        raise ValueError(f"export: the run averages eval_views={views!r}, which exports do not "
                           "compute; predictions would differ from run.predict. Export a run with "
                           "eval_views='single' (eval_flip is supported).")



# --------------------------------------------------------------------------- cnnlab predict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnnlab predict",
        description="Classify image files and folders (searched recursively) with a trained run.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="checkpoint: best (falls back to latest) or latest (default: best)")
    p.add_argument("--top_k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output on stdout (default: table)")
    p.add_argument("--batch_size", type=int, default=256, help="images decoded and classified at once")
    return p


def find_images(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(image files, problems)``: the files given, and the image files (by extension) under
    the folders given, each folder's sorted; a path that does not exist is a problem."""
    files, problems = [], []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                problems.append(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def _format(rows: list[tuple[str, list[tuple[str, float]]]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"file": f, "predictions": [{"class": c, "probability": round(p, 6)} for c, p in top]}
                           for f, top in rows], indent=2)
    k = len(rows[0][1])
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file", *(f"{x}_{i}" for i in range(1, k + 1) for x in ("class", "probability"))])
        for f, top in rows:
            writer.writerow([f, *(x for c, p in top for x in (c, f"{p:.6f}"))])
        return buf.getvalue().rstrip("\n")
    width = max(len("file"), *(len(f) for f, _ in rows))
    cell = max(len(c) for _, top in rows for c, _ in top) + 7
    lines = [f"{'file':<{width}}  " + "  ".join(f"{f'top {i}':<{cell}}" for i in range(1, k + 1)).rstrip()]
    lines += [f"{f:<{width}}  " + "  ".join(f"{f'{c} {p:.3f}':<{cell}}" for c, p in top).rstrip()
              for f, top in rows]
    return "\n".join(lines)


def predict_main(argv: list[str]) -> None:
    """``cnnlab predict``: ``argv`` is what follows ``predict`` on the command line. Prints the
    top-k classes of every image; unreadable files are named on stderr and skipped; exits 1
    when no image could be classified."""
    from tqdm.auto import tqdm

    args = _parser().parse_intermixed_args(argv)  # flags may come between the paths
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError(f"--top_k={args.top_k} and --batch_size={args.batch_size} must be at least 1")
    files, problems = find_images(args.paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not files:
        raise SystemExit("cnnlab predict: no image files to classify")
    run = load_run(args.workdir, which=args.which)
    k = min(args.top_k, len(run.class_names))
    rows = []
    with tqdm(total=len(files), desc="cnnlab predict", unit="img", disable=len(files) <= 20,
              file=sys.stderr) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start : start + args.batch_size]
            images, errors = run.read_images(chunk)
            for i, error in sorted(errors.items()):
                tqdm.write(f"{chunk[i]}: cannot read this image ({error})", file=sys.stderr)
            probs = run.predict(images) if len(images) else np.zeros((0, len(run.class_names)))
            ok = [f for i, f in enumerate(chunk) if i not in errors]
            for f, p in zip(ok, probs):
                order = np.argsort(-p, kind="stable")[:k]
                rows.append((f, [(run.class_names[j], float(p[j])) for j in order]))
            bar.update(len(chunk))
    if not rows:
        raise SystemExit(f"cnnlab predict: none of the {len(files)} file(s) could be read")
    print(_format(rows, args.format))
    failed = len(files) - len(rows)
    if failed:
        print(f"{failed} of {len(files)} file(s) could not be read (named above).", file=sys.stderr)
