"""Helpers for tests: tiny generated image trees in the CALTECH-101 layout.

Nothing here touches the real dataset; images are generated with Pillow.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ENV_REAL_DIR = "CALTECH101_DIR"


def write_image(
    path: Path, seed: int, size: tuple[int, int] = (24, 18), mode: str = "RGB", fmt: str = "JPEG"
) -> Path:
    """Writes a small random image (``size`` = (width, height)) in Pillow ``mode``/``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(base, "RGB")
    if mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_tree(
    root: Path,
    classes: dict[str, int] | None = None,
    *,
    size: tuple[int, int] = (24, 18),
    seed: int = 0,
) -> Path:
    """Creates ``root/<class>/image_NNNN.jpg`` with the given number of JPEGs per class
    (default: 3 classes of 8, 6 and 5 images) and returns ``root``."""
    classes = {"alpha": 8, "Beta": 6, "gamma": 5} if classes is None else classes
    for ci, (name, n) in enumerate(sorted(classes.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / name / f"image_{i + 1:04d}.jpg", seed * 1000 + ci * 100 + i, size)
    return root


def folder_config(root: Path, cache_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A data config for a generated tree: every class, decoded in-process, 8x8 images."""
    cfg = {"data_dir": str(root), "cache_dir": str(cache_dir), "classes": "all"}
    return {**cfg, "num_workers": 0, "image_size": 8, **overrides}


def truncate_file(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cuts a file to a fraction of its size (a truncated JPEG)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return path


def make_tar_gz(tree_root: Path, archive: Path) -> Path:
    """Packs ``tree_root`` as ``101_ObjectCategories/...`` into a .tar.gz."""
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree_root, arcname="101_ObjectCategories")
    return archive


def make_caltech_zip(tar_gz: Path, archive: Path) -> Path:
    """Wraps a tar.gz as ``caltech-101/101_ObjectCategories.tar.gz`` in a zip, like the
    distributed ``caltech-101.zip``."""
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tar_gz, arcname="caltech-101/101_ObjectCategories.tar.gz")
    return archive


def real_data_dir() -> Path | None:
    """The real dataset from ``$CALTECH101_DIR`` (None when unset or missing)."""
    d = os.environ.get(ENV_REAL_DIR)
    if not d or not Path(d).is_dir():
        return None
    return Path(d)
