"""``load_dataset``: source file list -> split assignment -> (cached) decoded arrays ->
:class:`Dataset`.

The split is computed from the sorted file list and the seed before anything is decoded;
files that fail to decode are then dropped from the split they were assigned to (named in a
warning and in ``manifest["skipped"]``), so they never move another file between splits.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from cnnlab._files import cache_root
from cnnlab.data import sources
from cnnlab.data._decode import load_image, resize_image, to_rgb
from cnnlab.data.cache import FORMAT_VERSION, compute_key, load_prepared, write_prepared
from cnnlab.data.config import CLASS_PRESETS, image_hw, resolve_config
from cnnlab.data.iterator import Batch, iterate_epoch, iterate_train, num_batches
from cnnlab.data.splits import assign_splits, class_count_table

_PREFIX = "[cnnlab.data]"


@dataclass
class Split:
    """One split: ``images`` uint8 [N, H, W, 3], ``labels`` int32 [N], the ``indices`` of its
    images in the prepared arrays and their relative ``files``."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    files: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def num_batches(self, batch_size: int, drop_remainder: bool = False) -> int:
        return num_batches(len(self), batch_size, drop_remainder)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, drop_remainder: bool = False, **options: int
    ) -> Iterator[Batch]:
        """One epoch of batches (:func:`cnnlab.data.iterator.iterate_epoch`, whose ``seed``,
        ``epoch`` and ``start_step`` it takes); the defaults suit evaluation (in order, padded
        last batch with ``mask``)."""
        return iterate_epoch(self.images, self.labels, batch_size, shuffle=shuffle,
                             drop_remainder=drop_remainder, **options)


@dataclass
class Dataset:
    """The prepared, split dataset returned by :func:`load_dataset`."""

    train: Split
    test: Split
    val: Split | None
    class_names: list[str]
    manifest: dict[str, Any]
    config: dict[str, Any] = field(repr=False)
    cache_path: Path | None = None
    cache_hit: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def splits(self) -> dict[str, Split]:
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        out["test"] = self.test
        return out

    @property
    def split_files(self) -> dict[str, list[str]]:
        """The sorted relative file names (``Faces/image_0001.jpg``; synthetic ids for the
        synthetic source) of each split; unreadable files are in none of them."""
        return {name: sorted(split.files) for name, split in self.splits().items()}

    def train_batches(
        self, batch_size: int, *, seed: int = 0, start_step: int = 0, num_epochs: int | None = None
    ) -> Iterator[Batch]:
        """Shuffled full training batches from global step ``start_step`` (see
        :func:`cnnlab.data.iterator.iterate_train`)."""
        return iterate_train(self.train.images, self.train.labels, batch_size, seed=seed,
                             start_step=start_step, num_epochs=num_epochs)

    def steps_per_epoch(self, batch_size: int) -> int:
        return num_batches(len(self.train), batch_size, True)

    def save_classes(self, path: str | os.PathLike) -> None:
        """Writes the sorted class names (label i = class_names[i]) as JSON, e.g. next to a
        checkpoint; the cache directory already holds the same ``classes.json``."""
        Path(path).write_text(json.dumps(self.class_names, indent=1))

    def summary(self) -> str:
        """Per-class counts of every split as a compact table."""
        return class_count_table(self.class_names, {k: v.labels for k, v in self.splits().items()})


# --------------------------------------------------------------------------- preparation


def _num_workers(requested: int) -> int:
    if requested == -1:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - non-Linux
            return max(1, os.cpu_count() or 1)
    return requested


def decode_images(
    paths: list[str],
    height: int,
    width: int,
    *,
    resize: str = "stretch",
    resample: str = "bilinear",
    pad_value: int = 0,
    fast_decode: bool = False,
    num_workers: int = -1,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decodes ``paths`` into uint8 [N, H, W, 3] with a progress bar, on all cores.

    Pillow releases the GIL while decoding and resampling, so a thread pool scales with the
    cores without worker processes (no pickling, no ``__main__`` re-import). Returns
    (images, ok mask, {index: error}) where failed entries are left zero.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    n = len(paths)
    out = np.zeros((n, height, width, 3), np.uint8)
    ok = np.zeros((n,), bool)
    errors: dict[int, str] = {}

    def decode(i: int) -> None:
        try:
            out[i] = load_image(paths[i], height, width, resize, resample, pad_value, fast_decode)
            ok[i] = True
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            errors[i] = f"{type(e).__name__}: {e}"

    workers = _num_workers(num_workers)
    bar = tqdm(total=n, desc=f"{_PREFIX} decoding", unit="img", disable=not progress, mininterval=0.5)
    with bar, ThreadPoolExecutor(max(workers, 1), thread_name_prefix="cnnlab-decode") as pool:
        for _ in (map if workers <= 1 or n < 32 else pool.map)(decode, range(n)):
            bar.update(1)
    return out, ok, errors


def _warn_skipped(skipped: list[dict[str, str]], where: str) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{s['file']} ({s['split']}: {s['error']})" for s in skipped[:20])
    more = f"; ... and {len(skipped) - 20} more (see the manifest)" if len(skipped) > 20 else ""
    warnings.warn(
        f"skipped {len(skipped)} unreadable image(s) in {where}, dropped from their splits: "
        f"{shown}{more}",
        stacklevel=3,
    )


def _preprocess_key(cfg: dict[str, Any]) -> dict[str, Any]:
    h, w = image_hw(cfg["image_size"])
    out = {
        "image_size": [h, w],
        "resize": cfg["resize"],
        "resample": cfg["resample"],
        "fast_decode": cfg["fast_decode"],
        "pillow": PIL.__version__,
    }
    if cfg["resize"] == "pad":
        out["pad_value"] = cfg["pad_value"]
    return out


@dataclass
class _Prepared:
    """Every listed file, in sorted order: ``images[i]`` (zeros where ``ok[i]`` is False, the
    file did not decode), ``labels[i]`` and ``files[i]``."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str]
    manifest: dict[str, Any]
    predefined_train: np.ndarray | None = None
    cache_path: Path | None = None
    cache_hit: bool = False
    ok: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.ok is None:
            self.ok = np.ones(len(self.files), bool)


def _check_nonempty_classes(class_names: list[str], labels: np.ndarray, where: str) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [c for c, k in zip(class_names, counts, strict=True) if k == 0]
    if empty:
        raise ValueError(f"no readable images for class(es) {empty} in {where}")


def _prepare_folder(cfg: dict[str, Any], verbose: bool) -> _Prepared:
    root_cache = cache_root(cfg["cache_dir"])
    root = sources.resolve_folder_root(cfg["data_dir"], root_cache, verbose)
    by_class, ignored = sources.scan_folder(root)
    if not by_class:
        raise FileNotFoundError(f"no class folders found in {root} (expected {root}/<class>/*.jpg)")
    chosen = sources.select_classes(list(by_class), cfg["classes"], cfg["drop_background"], where=str(root))
    empty = [c for c in chosen if not by_class[c]]
    if empty:
        raise ValueError(f"empty class folder(s) (no *.jpg files) in {root}: {empty}")
    cap = cfg["max_per_class"]
    entries = []
    labels_list = []
    for i, c in enumerate(chosen):
        es = by_class[c][:cap] if cap else by_class[c]
        entries.extend(es)
        labels_list.extend([i] * len(es))
    h, w = image_hw(cfg["image_size"])
    payload = {
        "format_version": FORMAT_VERSION,
        "source": "folder",
        "classes": chosen,
        "files": [[e.rel, e.size, e.mtime_ns] for e in entries],
        "preprocess": _preprocess_key(cfg),
    }
    key = compute_key(payload)
    cache_dir = root_cache / "prepared" / key
    where = str(root)
    if cfg["use_cache"]:
        loaded, reason = load_prepared(cache_dir, key)
        if loaded is not None:
            images, labels, class_names, manifest = loaded
            files = manifest["files"]
            bad = {s["file"] for s in manifest["skipped"]}
            ok = np.asarray([f not in bad for f in files], bool)
            return _Prepared(images, labels, class_names, files, manifest, None, cache_dir, True, ok)
        if reason != "missing":
            warnings.warn(f"rebuilding the data cache {cache_dir}: {reason}", stacklevel=3)
    t0 = time.perf_counter()
    options = {k: cfg[k] for k in ("resize", "resample", "pad_value", "fast_decode", "num_workers")}
    images, ok, errors = decode_images([str(root / e.rel) for e in entries], h, w, progress=verbose, **options)
    seconds = time.perf_counter() - t0
    labels = np.asarray(labels_list, np.int32)
    skipped = [{"file": entries[i].rel, "error": errors[i]} for i in sorted(errors)]
    if not ok.any():
        raise ValueError(f"zero readable images among the {len(entries)} files found in {root}")
    _check_nonempty_classes(chosen, labels[ok], where)
    files = [e.rel for e in entries]
    manifest = {
        "key": key,
        "source": "folder",
        "source_dir": str(root),
        "files": files,
        "skipped": skipped,
        "ignored_non_jpg": ignored,
        "preprocess": payload["preprocess"],
        "max_per_class": cap,
        "prepare_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cfg["use_cache"]:
        manifest = write_prepared(cache_dir, images, labels, chosen, manifest, cfg["cache_verify"])
    path = cache_dir if cfg["use_cache"] else None
    return _Prepared(images, labels, chosen, files, manifest, None, path, False, ok)


def _decoded_manifest(
    source: str, key: str, files: list[str], names: list[str], h: int, w: int, **extra: Any
) -> dict[str, Any]:
    """The manifest of a source decoded in memory (synthetic, tfds): nothing skipped."""
    return {"key": key, "source": source, "files": files, "skipped": [], "ignored_non_jpg": [],
            "num_images": len(files), "image_shape": [h, w, 3], "class_names": names, **extra}


def _prepare_synthetic(cfg: dict[str, Any]) -> _Prepared:
    h, w = image_hw(cfg["image_size"])
    images, labels, names, files = sources.make_synthetic(
        cfg["synthetic_num_classes"], cfg["synthetic_per_class"], h, w, cfg["synthetic_seed"]
    )
    if cfg["classes"] != "all" and not (
        isinstance(cfg["classes"], str) and cfg["classes"] in CLASS_PRESETS
    ):
        chosen = sources.select_classes(names, cfg["classes"], False, where="the synthetic classes")
        keep = np.isin(np.asarray(names)[labels], chosen)
        remap = np.asarray([chosen.index(n) if n in chosen else -1 for n in names], np.int32)
        images, labels = images[keep], remap[labels[keep]]
        files = [f for f, k in zip(files, keep, strict=True) if k]
        names = chosen
    if cfg["max_per_class"]:
        keep = np.zeros(labels.shape, bool)
        for c in range(len(names)):
            keep[np.flatnonzero(labels == c)[: cfg["max_per_class"]]] = True
        images, labels = images[keep], labels[keep]
        files = [f for f, k in zip(files, keep, strict=True) if k]
    key = compute_key(
        {
            "source": "synthetic",
            "n": cfg["synthetic_num_classes"],
            "per_class": cfg["synthetic_per_class"],
            "seed": cfg["synthetic_seed"],
            "size": [h, w],
            "classes": names,
            "cap": cfg["max_per_class"],
        }
    )
    synthetic = {k: cfg[f"synthetic_{k}"] for k in ("num_classes", "per_class", "seed")}
    manifest = _decoded_manifest("synthetic", key, files, names, h, w, synthetic=synthetic)
    return _Prepared(images, labels, names, files, manifest)


def _prepare_tfds(cfg: dict[str, Any], verbose: bool) -> _Prepared:
    names, examples = sources.load_tfds_examples(
        cfg["tfds_data_dir"], cfg["tfds_manual_dir"], cfg["tfds_download"]
    )
    chosen = sources.select_classes(sorted(names), cfg["classes"], cfg["drop_background"],
                                    case_insensitive=True, where="tfds caltech101")
    h, w = image_hw(cfg["image_size"])
    rows = sorted((name, f"{name}/{fname}", img, train) for name, fname, img, train in examples if name in chosen)
    cap = cfg["max_per_class"]
    if cap:
        kept, seen = [], {}
        for r in rows:
            seen[r[0]] = seen.get(r[0], 0) + 1
            if seen[r[0]] <= cap:
                kept.append(r)
        rows = kept
    if not rows:
        raise ValueError("zero images selected from tfds caltech101")
    images = np.empty((len(rows), h, w, 3), np.uint8)
    for i, (_, _, img, _) in enumerate(rows):
        arr = np.asarray(img)
        im = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        images[i] = np.asarray(
            resize_image(to_rgb(im), h, w, cfg["resize"], cfg["resample"], cfg["pad_value"])
        )
    labels = np.asarray([chosen.index(r[0]) for r in rows], np.int32)
    files = [r[1] for r in rows]
    is_train = np.asarray([r[3] for r in rows], bool)
    key = compute_key({"source": "tfds", "files": files, "preprocess": _preprocess_key(cfg)})
    manifest = _decoded_manifest("tfds", key, files, chosen, h, w, preprocess=_preprocess_key(cfg))
    _check_nonempty_classes(chosen, labels, "tfds caltech101")
    return _Prepared(images, labels, chosen, files, manifest, is_train)


def _make_split(prep: _Prepared, idx: np.ndarray) -> Split:
    idx = np.asarray(idx, np.int64)
    idx = idx[prep.ok[idx]]  # unreadable files leave the split they were assigned to
    order = np.argsort(idx, kind="stable")  # read the memory map in file order
    images = np.empty((idx.size, *prep.images.shape[1:]), np.uint8)
    images[order] = prep.images[idx[order]]
    return Split(images, prep.labels[idx].astype(np.int32), idx, [prep.files[i] for i in idx])


def _prepare(cfg: dict[str, Any], verbose: bool) -> _Prepared:
    if cfg["source"] == "folder":
        return _prepare_folder(cfg, verbose)
    if cfg["source"] == "synthetic":
        return _prepare_synthetic(cfg)
    return _prepare_tfds(cfg, verbose)


def _split(prep: _Prepared, cfg: dict[str, Any], *, warn: bool, test: Split | None = None) -> Dataset:
    """The :class:`Dataset` of ``prep`` under the split fields of ``cfg`` (``test``: the test
    split, when an equal one was made already: folds share it)."""
    names = prep.class_names
    assigned = assign_splits(cfg, prep.labels, prep.files, names, predefined_train=prep.predefined_train)
    split_of = {int(i): name for name, idx in assigned.items() for i in idx}
    index = {f: i for i, f in enumerate(prep.files)}
    skipped = [{**s, "split": split_of[index[s["file"]]]} for s in prep.manifest["skipped"]]
    if warn:
        _warn_skipped(skipped, str(prep.manifest.get("source_dir", cfg["source"])))
    splits = {name: test if name == "test" and test is not None else _make_split(prep, idx)
              for name, idx in assigned.items()}
    return Dataset(
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
        class_names=list(names),
        manifest={**prep.manifest, "skipped": skipped},
        config=cfg,
        cache_path=prep.cache_path,
        cache_hit=prep.cache_hit,
    )


def _say_loaded(ds: Dataset, prep: _Prepared, cfg: dict[str, Any], seconds: float) -> None:
    h, w = image_hw(cfg["image_size"])
    how = ("cache hit" if prep.cache_hit else "prepared") + (f" {prep.cache_path}" if prep.cache_path else "")
    folds = f", fold {cfg['fold']} of {cfg['folds']} validates" if cfg.get("folds") else ""
    print(
        f"{_PREFIX} {cfg['source']}: {len(ds.class_names)} classes, {int(prep.ok.sum()):,} images at {h}x{w} "
        f"({cfg['resize']}), split={cfg['split']}{folds}, skipped={len(ds.manifest['skipped'])}; "
        f"{how} in {seconds:.2f} s",
        flush=True,
    )
    print(ds.summary(), flush=True)


def load_dataset(config: Any = None, *, verbose: bool = True) -> Dataset:
    """Loads (preparing and caching on first use) and splits the configured dataset.

    Args:
      config: a ``ml_collections.ConfigDict`` or dict with the fields of
        :func:`cnnlab.data.default_data_config` (missing fields take their defaults).
      verbose: print a one-line summary, the per-class split table and a progress bar.

    Raises:
      ValueError: unknown fields, bad values, empty class folders, zero images, too-small
        classes for the split.
      FileNotFoundError: the data directory (or ``$CALTECH101_DIR``) is missing.
      ImportError: ``source="tfds"`` without tensorflow-datasets.
    """
    return load_folds(config, None, verbose=verbose)[0]


def load_folds(config: Any, folds: Sequence[int] | None, *, verbose: bool = True) -> list[Dataset]:
    """:func:`load_dataset` for each validation fold in ``folds`` of a config with
    ``folds >= 2`` (``None``: the config's own ``fold``), from one preparation: the same
    images and test split, each fold's own training and validation splits."""
    cfg = resolve_config(config)
    if folds is not None and not cfg["folds"]:
        raise ValueError("load_folds: the data config has folds=0 (no k-fold validation)")
    t0 = time.perf_counter()
    prep = _prepare(cfg, verbose)
    out: list[Dataset] = []
    for i, fold in enumerate([cfg["fold"]] if folds is None else folds):
        fold_cfg = cfg if folds is None else {**cfg, "fold": int(fold)}
        out.append(_split(prep, fold_cfg, warn=i == 0, test=out[0].test if out else None))
    if verbose:
        _say_loaded(out[0], prep, out[0].config, time.perf_counter() - t0)
    return out
