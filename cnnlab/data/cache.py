"""On-disk cache of prepared arrays: memory-mappable .npy files plus a JSON manifest.

Layout of one prepared dataset, ``<cache_root>/prepared/<key>/``::

    images.npy     uint8 [N, H, W, 3], one row per listed file (zeros for an unreadable one)
    labels.npy     int32 [N]
    classes.json   the sorted class names (label i = classes[i])
    manifest.json  key, format version, shapes, checksums, the N files, the unreadable
                   (``skipped``) ones, options

Unreadable files keep their row so that a cached dataset lists the same files, and so gets the
same split, as a fresh one; the split drops them after assignment.

The key is a hash of everything the arrays depend on (the sorted relative file list with
sizes and mtimes, the image size, resize mode and the other preprocessing options), so a
changed, added or removed file selects a new directory. A directory is written to a temporary
sibling, fsynced and moved into place with ``os.replace``; a reader verifies the format
version, key, shapes, dtypes and checksums and rebuilds anything that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # 2: unreadable files keep a (zero) row
_CHUNK = 1 << 24


def compute_key(payload: Any) -> str:
    """A stable hex key for a JSON-serialisable payload."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def array_checksum(arr: np.ndarray, mode: str = "full") -> str:
    """CRC32 of the array's bytes (``full``), or of 256 evenly spaced 4 KiB blocks plus the
    size (``sample``, for arrays too large to read on every load)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    n = flat.size
    crc = zlib.crc32(str((arr.shape, str(arr.dtype))).encode())
    used = "full" if mode == "full" or n <= 256 * 4096 else "sample"
    if used == "full":
        for i in range(0, n, _CHUNK):
            crc = zlib.crc32(memoryview(flat[i : i + _CHUNK]), crc)
    else:
        starts = np.linspace(0, n - 4096, 256).astype(np.int64)
        for s in starts:
            crc = zlib.crc32(memoryview(flat[s : s + 4096]), crc)
    return f"{used}:{crc:08x}"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not path.is_dir():  # pragma: no cover - some platforms cannot fsync a directory
            raise


def write_prepared(
    directory: Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    manifest: dict[str, Any],
    verify: str = "full",
) -> dict[str, Any]:
    """Writes a prepared dataset atomically to ``directory`` and returns the stored manifest."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest.update(
        format_version=FORMAT_VERSION,
        num_images=int(images.shape[0]),
        image_shape=list(images.shape[1:]),
        class_names=list(class_names),
        checksums={
            "images": array_checksum(images, verify),
            "labels": array_checksum(labels, "full"),
        },
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        np.save(tmp / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
        np.save(tmp / "labels.npy", np.ascontiguousarray(labels, dtype=np.int32))
        (tmp / "classes.json").write_text(json.dumps(list(class_names), indent=1))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in ("images.npy", "labels.npy", "classes.json", "manifest.json", "."):
            _fsync(tmp / name)
        if directory.exists():  # stale or damaged: move aside, then replace
            trash = Path(tempfile.mkdtemp(prefix=f".old-{directory.name}-", dir=directory.parent))
            try:
                os.replace(directory, trash / "d")
            except OSError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, directory)
        except OSError:
            # Another process finished the same key first; keep theirs if it verifies.
            if load_prepared(directory, manifest["key"])[0] is None:
                raise
        _fsync(directory.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def load_prepared(
    directory: Path, key: str, mmap: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]] | None, str]:
    """Loads and verifies a prepared dataset.

    Returns ``((images, labels, class_names, manifest), "ok")`` or ``(None, reason)`` when the
    directory is missing, incomplete, from another format version or key, or fails a
    shape/dtype/checksum check. ``images`` is a read-only memory map when ``mmap``.
    """
    mpath = directory / "manifest.json"
    if not mpath.exists():
        return None, "missing"
    try:
        manifest = json.loads(mpath.read_text())
        classes = json.loads((directory / "classes.json").read_text())
        images = np.load(directory / "images.npy", mmap_mode="r" if mmap else None)
        labels = np.load(directory / "labels.npy")
    except Exception as e:  # noqa: BLE001 - any read failure means "rebuild"
        return None, f"unreadable ({type(e).__name__}: {e})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, f"format version {manifest.get('format_version')} != {FORMAT_VERSION}"
    if manifest.get("key") != key:
        return None, "key mismatch (stale)"
    n = manifest.get("num_images")
    shape = manifest.get("image_shape")
    if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape) != [n, *shape]:
        return None, f"images shape/dtype {images.shape} {images.dtype} != manifest [{n}, {shape}] uint8"
    if labels.dtype != np.int32 or labels.shape != (n,):
        return None, f"labels shape/dtype {labels.shape} {labels.dtype} != manifest [{n}] int32"
    if classes != manifest.get("class_names"):
        return None, "classes.json does not match the manifest"
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        return None, "labels out of range"
    sums = manifest.get("checksums", {})
    img_sum = sums.get("images", "")
    mode = img_sum.split(":", 1)[0] if ":" in img_sum else "full"
    if array_checksum(images, mode) != img_sum:
        return None, "images checksum mismatch (damaged)"
    if array_checksum(labels, "full") != sums.get("labels"):
        return None, "labels checksum mismatch (damaged)"
    return (images, labels, classes, manifest), "ok"
