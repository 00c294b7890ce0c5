"""The data config's fields (``config.data``), declared once in :func:`data_schema`.

:func:`resolve_config` turns a ``ml_collections.ConfigDict`` or a plain ``dict`` into a
validated, fully populated plain dict, raising :class:`cnnlab.schema.ConfigError` naming the
key. ``cnnlab train --help`` lists every field with its default and doc.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from cnnlab.data.augmentations import augment_schema
from cnnlab.schema import Field, Schema, Section, at_least, default_config, in_range, invalid, resolve

#: Named class selections.
CLASS_PRESETS: dict[str, tuple[str, ...]] = {
    # The Keras Conv2D tutorial's four classes (2,233 images).
    "tutorial4": ("Faces", "Leopards", "Motorbikes", "airplanes"),
}

BACKGROUND_CLASS = "BACKGROUND_Google"


def _classes_check(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v.strip(" ,") else "must be 'all', a preset name or class names"
    ok = v and all(isinstance(s, str) and s for s in v)
    return None if ok else "must be 'all', a preset name or a list of class names"


def _classes(v: Any) -> str | tuple[str, ...]:
    if not isinstance(v, str):
        return tuple(v)
    v = v.strip()
    return v if v in ("all", *CLASS_PRESETS) else tuple(s.strip() for s in v.split(",") if s.strip())


def _size_check(v: Any) -> str | None:
    pair = isinstance(v, tuple) and len(v) == 2
    ok = all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in (v if pair else (v,)))
    return None if ok and (pair or isinstance(v, int)) else "must be a positive int or (height, width)"


def _path(doc: str, *, affects_results: bool = True) -> Field:
    return Field(None, str, doc=doc, convert=lambda v: v or None, affects_results=affects_results)


def _fraction(default: float, doc: str, *, allow_zero: bool) -> Field:
    def check(v):
        ok = 0.0 <= v < 1.0 if allow_zero else 0.0 < v < 1.0
        return None if ok else f"must be in {'[0' if allow_zero else '(0'}, 1)"
    return Field(default, float, check, doc)


def data_schema() -> Schema:
    """Every ``data`` field; ``augment`` holds the registered augmentation ops' parameters.
    Resolving it also checks that ``fold`` indexes one of ``folds`` folds (the one cross-field
    rule of the group), wherever the group is resolved."""
    return Section({
        "source": Field("folder", str, choices=("folder", "synthetic", "tfds"),
                        doc="101_ObjectCategories tree or archive, generated shapes, or tensorflow-datasets"),
        "data_dir": _path("folder source: the class root, a folder holding it or its archive "
                          "(else $CALTECH101_DIR)", affects_results=False),
        "classes": Field("tutorial4", (str, tuple), _classes_check, convert=_classes,
                         doc="'all', a preset (tutorial4 = Faces, Leopards, Motorbikes, airplanes), "
                             "'a,b,c' or a list; labels index the sorted list"),
        "drop_background": Field(False, bool, doc=f"drop {BACKGROUND_CLASS}"),
        "max_per_class": Field(0, int, at_least(0), "keep the first this many images per class (0: all)"),
        "split": Field("stratified", str, choices=("stratified", "tfds"),
                       doc="stratified: the tutorial's train_test_split (exactly); tfds: "
                           "train_per_class images per class for training, the rest test"),
        "test_fraction": _fraction(0.25, "stratified test share, ceil(test_fraction * n)",
                                   allow_zero=False),
        "train_per_class": Field(30, int, at_least(1), "tfds protocol: training images per class"),
        "val_fraction": _fraction(0.1, "validation share carved (stratified) from the training split",
                                  allow_zero=True),
        "split_seed": Field(42, int, at_least(0), "seed of the split and of the validation carve"),
        "folds": Field(0, int, lambda v: None if v == 0 or v >= 2 else "must be 0 (off) or >= 2",
                       "k-fold validation: the training split's images in k stratified folds of "
                       "equal size; fold `fold` is the validation split (replacing val_fraction's "
                       "carve) and the others train (0: off)"),
        "fold": Field(0, int, at_least(0), "which of the `folds` folds validates (0 .. folds-1)"),
        "image_size": Field(96, (int, tuple), _size_check, doc="output size, int or (height, width)"),
        "resize": Field("stretch", str, choices=("stretch", "crop", "pad"),
                        doc="ignore aspect / shorter side then centre crop / letterbox"),
        "resample": Field("bilinear", str,
                          choices=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
                          doc="Pillow filter (antialiased when downscaling)"),
        "pad_value": Field(0, int, in_range(0, 255, hi_open=False), "letterbox colour of resize='pad'"),
        "fast_decode": Field(False, bool, doc="let the JPEG decoder downscale (faster, not bit-identical)"),
        # where and how the images are read: the split record checks the same images come back
        "cache_dir": _path("cache root (else $CNNLAB_CACHE_DIR, else ~/.cache/cnnlab)",
                           affects_results=False),
        "use_cache": Field(True, bool, doc="read/write prepared arrays in the cache (folder source)",
                           affects_results=False),
        "cache_verify": Field("full", str, choices=("full", "sample"), affects_results=False,
                              doc="checksum the whole image array on load, or 256 sampled blocks"),
        "num_workers": Field(-1, int, at_least(-1), "decoding threads: -1 all cores, 0 in-process",
                             affects_results=False),
        "synthetic_num_classes": Field(4, int, in_range(2, 64, hi_open=False), "synthetic classes"),
        "synthetic_per_class": Field(100, int, at_least(2), "synthetic images per class"),
        "synthetic_seed": Field(0, int, at_least(0), "synthetic images' seed"),
        "tfds_data_dir": _path("where tfds keeps its prepared data"),
        "tfds_manual_dir": _path("tfds DownloadConfig(manual_dir=...)"),
        "tfds_download": Field(False, bool, doc="let tfds download and prepare the dataset"),
        "augment": augment_schema(),
    }, _check_fold)


def _check_fold(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """``cfg`` unchanged, or a ConfigError when ``fold`` does not index one of ``folds`` folds."""
    if cfg["folds"] and not cfg["fold"] < cfg["folds"]:
        raise invalid(f"{path}.fold", cfg["fold"],
                      f"must be < folds={cfg['folds']} (folds are numbered 0 .. {cfg['folds'] - 1})")
    if not cfg["folds"] and cfg["fold"]:
        raise invalid(f"{path}.fold", cfg["fold"], "needs folds >= 2 (folds=0: no k-fold validation)")
    return cfg


def default_data_config() -> ml_collections.ConfigDict:
    """All data fields with their defaults, as a ConfigDict a training config can embed."""
    return default_config(data_schema())


def resolve_config(config: Any = None) -> dict[str, Any]:
    """Validated, fully populated plain-dict data config (defaults for missing fields).

    Raises:
      ConfigError: an unknown key or a bad value (a ``ValueError`` naming the key).
    """
    return resolve(data_schema(), config, prefix="data.")


def known_num_classes(config: Any = None) -> int | None:
    """How many classes the data config selects, told without reading the data: a preset's or
    a list's distinct names (less the background class with ``drop_background``; tfds compares
    names case-insensitively), or the synthetic source's ``synthetic_num_classes`` (which
    ignores presets); None for ``classes="all"`` of a folder or tfds source (as many as the
    data has)."""
    cfg = resolve_config(config)
    classes = cfg["classes"]
    if cfg["source"] == "synthetic":
        return cfg["synthetic_num_classes"] if isinstance(classes, str) else len(set(classes))
    if classes == "all":
        return None
    fold = str.lower if cfg["source"] == "tfds" else str
    names = {fold(n) for n in (CLASS_PRESETS[classes] if isinstance(classes, str) else classes)}
    if cfg["drop_background"]:
        names = {n for n in names if n.lower() != BACKGROUND_CLASS.lower()}
    return len(names)


def image_hw(image_size: Any) -> tuple[int, int]:
    """``96`` -> ``(96, 96)``; ``(h, w)`` -> ``(h, w)``."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return int(image_size), int(image_size)
    return int(image_size[0]), int(image_size[1])
