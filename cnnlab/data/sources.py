"""Data sources: the CALTECH-101 folder tree (or its archive), synthetic images, tfds.

Every source ends in the same structure: uint8 RGB images ``[N, H, W, 3]``, int32 labels
indexing a sorted class list, and one relative file name per image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnlab.data.config import BACKGROUND_CLASS, CLASS_PRESETS

ENV_DATA_DIR = "CALTECH101_DIR"
ROOT_FOLDER_NAME = "101_ObjectCategories"
ARCHIVE_NAMES = ("101_ObjectCategories.tar.gz", "caltech-101.zip")
# As tfds: only *.jpg (case-insensitive here); BACKGROUND_Google/tmp is excluded.
IMAGE_SUFFIX = ".jpg"


@dataclass(frozen=True)
class FileEntry:
    """One image file: path relative to the class root, its size and mtime (ns)."""

    rel: str
    size: int
    mtime_ns: int


# --------------------------------------------------------------------------- folder


def _is_archive(p: Path) -> bool:
    n = p.name.lower()
    return p.is_file() and (n.endswith((".tar.gz", ".tgz", ".tar", ".zip")))


def _has_class_dirs(p: Path) -> bool:
    try:
        for d in os.scandir(p):
            if d.is_dir() and not d.name.startswith("."):
                for f in os.scandir(d.path):
                    if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIX):
                        return True
    except OSError:
        return False
    return False


def _find_root_in(extracted: Path) -> Path | None:
    for dirpath, dirnames, _ in os.walk(extracted):
        if os.path.basename(dirpath) == ROOT_FOLDER_NAME:
            return Path(dirpath)
        dirnames.sort()
    return extracted if _has_class_dirs(extracted) else None


def _safe_extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        try:
            tf.extractall(dest, filter="data")
        except TypeError:  # pragma: no cover - Python without extraction filters
            tf.extractall(dest)  # noqa: S202


def _extract_archive(archive: Path, dest: Path) -> None:
    """Extracts a tar(.gz) or a zip (expanding a ``101_ObjectCategories.tar.gz`` inside it)."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            inner = [n for n in names if n.endswith(ARCHIVE_NAMES[0])]
            if inner:
                zf.extract(inner[0], dest / "_zip")
                _safe_extract_tar(dest / "_zip" / inner[0], dest)
                shutil.rmtree(dest / "_zip", ignore_errors=True)
            else:
                for n in names:  # zip of the folder tree itself
                    target = (dest / n).resolve()
                    if not str(target).startswith(str(dest.resolve())):
                        raise ValueError(f"unsafe path {n!r} in {archive}")
                zf.extractall(dest)
    else:
        _safe_extract_tar(archive, dest)


def extract_archive_cached(archive: Path, cache_root: Path, verbose: bool = True) -> Path:
    """Extracts ``archive`` once into ``<cache_root>/extracted/<hash>`` (atomically) and
    returns the class root inside it."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    final = cache_root / "extracted" / key
    if final.is_dir() and (final / ".complete").exists():
        root = _find_root_in(final)
        if root is not None:
            return root
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        if verbose:
            print(f"[cnnlab.data] extracting {archive} -> {final}", flush=True)
        _extract_archive(archive, tmp)
        (tmp / ".complete").write_text(str(archive.resolve()))
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / ".complete").exists():  # lost a race with a broken winner
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    root = _find_root_in(final)
    if root is None:
        raise FileNotFoundError(
            f"no {ROOT_FOLDER_NAME}/ class folders found inside the archive {archive} (extracted to {final})"
        )
    return root


def resolve_folder_root(
    data_dir: str | os.PathLike | None, cache_root: Path, verbose: bool = True
) -> Path:
    """Finds the folder whose sub-folders are the classes.

    ``data_dir`` (or, when None, the ``CALTECH101_DIR`` environment variable) may be the class
    root itself, a folder containing ``101_ObjectCategories/``, an archive
    (``101_ObjectCategories.tar.gz`` or ``caltech-101.zip``), or a folder containing one.
    """
    if data_dir is None:
        env = os.environ.get(ENV_DATA_DIR)
        if not env:
            raise FileNotFoundError(
                f"no CALTECH-101 location: set the data config field 'data_dir' or the environment variable {ENV_DATA_DIR} "
                f"to the {ROOT_FOLDER_NAME} folder (or the archive)"
            )
        data_dir = env
        origin = f"${ENV_DATA_DIR}"
    else:
        origin = "data_dir"
    p = Path(os.path.expanduser(str(data_dir)))
    if not p.exists():
        raise FileNotFoundError(
            f"{origin}: {p} does not exist (looked for the {ROOT_FOLDER_NAME} folder or archive there)"
        )
    if _is_archive(p):
        return extract_archive_cached(p, cache_root, verbose)
    if not p.is_dir():
        raise FileNotFoundError(f"{origin}: {p} is neither a folder nor a .tar.gz/.zip archive")
    if (p / ROOT_FOLDER_NAME).is_dir():
        return p / ROOT_FOLDER_NAME
    for name in ARCHIVE_NAMES:
        if (p / name).is_file() and not _has_class_dirs(p):
            return extract_archive_cached(p / name, cache_root, verbose)
    return p


def scan_folder(root: Path) -> tuple[dict[str, list[FileEntry]], list[str]]:
    """Lists ``<root>/<class>/*.jpg`` (sorted), returning ({class: entries}, ignored files).

    Only files ending in ``.jpg`` (any case) count, as in the tfds builder; anything else
    (e.g. ``BACKGROUND_Google/tmp``, a JPEG without the suffix) is returned in ``ignored``.
    Hidden entries (starting with ``.``) are skipped silently. Sub-folders of class folders
    are not searched.
    """
    classes: dict[str, list[FileEntry]] = {}
    ignored: list[str] = []
    with os.scandir(root) as it:
        dirs = sorted(d.name for d in it if d.is_dir() and not d.name.startswith("."))
    for name in dirs:
        entries: list[FileEntry] = []
        with os.scandir(root / name) as it:
            for f in it:
                if f.name.startswith(".") or not f.is_file():
                    continue
                rel = f"{name}/{f.name}"
                if f.name.lower().endswith(IMAGE_SUFFIX):
                    st = f.stat()
                    entries.append(FileEntry(rel, st.st_size, st.st_mtime_ns))
                else:
                    ignored.append(rel)
        entries.sort(key=lambda e: e.rel)
        classes[name] = entries
    return classes, sorted(ignored)


def select_classes(
    available: list[str],
    classes: str | tuple[str, ...],
    drop_background: bool,
    *,
    case_insensitive: bool = False,
    where: str = "",
) -> list[str]:
    """Resolves a class selection ("all", a preset name, or names) to sorted available names."""
    if classes == "all":
        chosen = list(available)
    else:
        wanted = CLASS_PRESETS[classes] if isinstance(classes, str) else classes
        fold = str.lower if case_insensitive else str
        lookup = {fold(a): a for a in available}
        missing = [w for w in wanted if fold(w) not in lookup]
        if missing:
            raise ValueError(
                f"data config field 'classes': {missing} not found{' in ' + where if where else ''}; "
                f"available: {sorted(available)}"
            )
        chosen = sorted({lookup[fold(w)] for w in wanted})
    if drop_background:
        chosen = [c for c in chosen if c.lower() != BACKGROUND_CLASS.lower()]
    if not chosen:
        raise ValueError(
            f"data config field 'classes': the selection {classes!r} is empty{' in ' + where if where else ''}"
        )
    return sorted(chosen)


# --------------------------------------------------------------------------- synthetic

_SHAPES = ("circle", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross")
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 210),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}


def synthetic_class_names(num_classes: int) -> list[str]:
    """Names ``<shape>_<colour>`` of the first ``num_classes`` synthetic classes (unsorted)."""
    colours = list(_COLOURS)
    return [f"{_SHAPES[c % 8]}_{colours[(c + c // 8) % 8]}" for c in range(num_classes)]


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: np.ndarray) -> np.ndarray:
    ay, ax = np.abs(dy), np.abs(dx)
    inside_sq = (ay < r) & (ax < r)
    if shape == "circle":
        return dy**2 + dx**2 < r**2
    if shape == "square":
        return inside_sq
    if shape == "triangle":
        return (dy < r) & (dy > -r) & (ax < (dy + r) / 2)
    if shape == "hstripes":
        return inside_sq & (np.floor(dy / (r / 3)).astype(np.int64) % 2 == 0)
    if shape == "vstripes":
        return inside_sq & (np.floor(dx / (r / 3)).astype(np.int64) % 2 == 0)
    if shape == "checker":
        return inside_sq & (
            (np.floor(dy / (r / 2)) + np.floor(dx / (r / 2))).astype(np.int64) % 2 == 0
        )
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    if shape == "cross":
        return ((ax < r / 3) & (ay < r)) | ((ay < r / 3) & (ax < r))
    raise ValueError(shape)


def make_synthetic(
    num_classes: int, per_class: int, height: int, width: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Generates ``per_class`` uint8 RGB images for each of ``num_classes`` classes.

    Class ``c`` is a coloured shape or texture (8 shapes x 8 colours, unique pairs for up to 64
    classes) at a random position and scale on a random grey, noisy background. The output is
    a deterministic function of the arguments. Returns (images, labels, sorted class names,
    file names); labels index the sorted names.
    """
    names = synthetic_class_names(num_classes)
    order = sorted(names)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = np.empty((num_classes * per_class, height, width, 3), np.uint8)
    labels = np.empty((num_classes * per_class,), np.int32)
    files: list[str] = []
    scale = float(min(height, width))
    k = 0
    for c, name in enumerate(names):
        shape, colour = name.split("_")
        rng = np.random.default_rng([seed, c])
        n = per_class
        r = rng.uniform(0.22, 0.38, (n, 1, 1)) * scale
        cy = height / 2 + rng.uniform(-0.18, 0.18, (n, 1, 1)) * height
        cx = width / 2 + rng.uniform(-0.18, 0.18, (n, 1, 1)) * width
        mask = _shape_mask(shape, yy[None] - cy, xx[None] - cx, r)[..., None]
        bg = rng.uniform(40, 140, (n, 1, 1, 1)) + rng.normal(0, 6, (n, 1, 1, 3))
        fg = np.asarray(_COLOURS[colour], np.float64)[None, None, None] + rng.normal(
            0, 12, (n, 1, 1, 3)
        )
        img = np.where(mask, fg, bg) + rng.normal(0, 10, (n, height, width, 3))
        images[k : k + n] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        labels[k : k + n] = order.index(name)
        files.extend(f"{name}/synthetic_{i:05d}.png" for i in range(n))
        k += n
    # Sort by (class name, file) so the layout matches the folder source.
    idx = np.argsort(np.asarray(files), kind="stable")
    return images[idx], labels[idx], order, [files[i] for i in idx]


# --------------------------------------------------------------------------- tfds

TFDS_INSTALL_HINT = 'the "tfds" data source needs tensorflow-datasets: pip install "cnnlab[tfds]"'


def import_tfds():
    """Imports tensorflow_datasets lazily, with a clear error when it is missing."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(TFDS_INSTALL_HINT) from e
    return tfds


def load_tfds_examples(
    tfds_data_dir: str | None, manual_dir: str | None, download: bool
) -> tuple[list[str], list[tuple[str, str, np.ndarray, bool]]]:
    """Reads every example of tfds ``caltech101`` as (class name, file name, image, is_train).

    Class names are tfds' label names (lower-cased folder names). The builder is prepared
    only if ``download`` is set or a ``manual_dir`` is given (passed to tfds'
    ``DownloadConfig``); otherwise an unprepared builder is an error.
    """
    tfds = import_tfds()
    builder = tfds.builder("caltech101", data_dir=tfds_data_dir)
    try:
        prepared = bool(builder.info.splits["train"].num_examples)
    except Exception:  # noqa: BLE001 - tfds raises various errors for unprepared builders
        prepared = False
    if not prepared:
        if not download and manual_dir is None:
            raise FileNotFoundError(
                f"tfds caltech101 is not prepared in {tfds_data_dir or '~/tensorflow_datasets'}; set tfds_download=True "
                "(needs network) or tfds_manual_dir, or use source='folder' with the archive"
            )
        kwargs = {}
        if manual_dir is not None:
            kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        builder.download_and_prepare(**kwargs)
    names = list(builder.info.features["label"].names)
    out: list[tuple[str, str, np.ndarray, bool]] = []
    for split, is_train in (("train", True), ("test", False)):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            fname = ex.get("image/file_name", b"")
            fname = fname.decode() if isinstance(fname, bytes) else str(fname)
            out.append((names[int(ex["label"])], fname, np.asarray(ex["image"]), is_train))
    return names, out
