"""Split protocols, applied to a file list by :func:`assign_splits`.

* :func:`stratified_split` is a line-by-line port of scikit-learn's ``StratifiedShuffleSplit``
  (as used by ``train_test_split(..., stratify=y, random_state=seed)``): the very same indices,
  in the same order, without depending on scikit-learn.
* :func:`tfds_split`: a fixed number of seeded training images per class, the rest test.
* :func:`carve_validation`: a stratified, seeded validation split out of the training split.
* :func:`fold_validation`: fold ``j`` of ``k`` stratified, equal-sized folds of the training
  split as the validation split (k-fold cross-validation).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    # sklearn.utils.extmath._approximate_mode
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        values = np.sort(np.unique(remainder))[::-1]
        for value in values:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _class_key(c: int, class_names: Sequence[str] | None) -> str:
    return class_names[int(c)] if class_names is not None else str(int(c))


def _draw(n: int, k: int, seed: int, key: str) -> np.ndarray:
    """``k`` of ``range(n)`` without replacement by ``default_rng([seed, crc32(key)])``: a
    class's draw depends on its own key only, not on the other classes."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())]).choice(n, size=k, replace=False)


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    test_size: float = 0.25,
    random_state: int = 42,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified shuffle split, identical to ``sklearn.model_selection.train_test_split(
    np.arange(n), test_size=test_size, stratify=labels, random_state=random_state)``.

    Returns (train_indices, test_indices) as int64 arrays in scikit-learn's (shuffled) order.
    ``n_test = ceil(test_size * n)``; each class needs at least 2 members.
    """
    y = np.asarray(labels)
    n = y.shape[0]
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_test == 0 or n_train == 0:
        raise ValueError(f"a {test_size} split of {n} samples leaves an empty subset")
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    n_classes = classes.shape[0]
    if np.min(class_counts) < 2:
        few = classes[class_counts < 2].tolist()
        if class_names is not None:
            few = [class_names[int(c)] for c in few]
        raise ValueError(f"stratified split: classes with fewer than 2 images: {few}")
    if n_train < n_classes:
        raise ValueError(f"stratified split: train size {n_train} < number of classes {n_classes}")
    if n_test < n_classes:
        raise ValueError(f"stratified split: test size {n_test} < number of classes {n_classes}")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(random_state)
    n_i = _approximate_mode(class_counts, n_train, rng)
    class_counts_remaining = class_counts - n_i
    t_i = _approximate_mode(class_counts_remaining, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(n_classes):
        permutation = rng.permutation(class_counts[i])
        perm_indices_class_i = class_indices[i].take(permutation, mode="clip")
        train.extend(perm_indices_class_i[: n_i[i]])
        test.extend(perm_indices_class_i[n_i[i] : n_i[i] + t_i[i]])
    train_arr = rng.permutation(np.asarray(train, dtype=np.int64))
    return train_arr, rng.permutation(np.asarray(test, dtype=np.int64))


def tfds_split(
    labels: Sequence[int] | np.ndarray,
    files: Sequence[str],
    train_per_class: int = 30,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``train_per_class`` training images per class, the rest test (the tfds protocol).

    For each class the files are sorted by name and ``train_per_class`` of them are drawn
    without replacement by ``np.random.default_rng([seed, crc32(class key)])`` (the class name,
    or the label without names), so selecting other classes does not change a class's split.
    Returns sorted (train_indices, test_indices). A class with ``<= train_per_class`` images is
    an error (as in tfds).
    """
    y = np.asarray(labels)
    files_arr = np.asarray(files)
    if files_arr.shape[0] != y.shape[0]:
        raise ValueError("labels and files differ in length")
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[np.argsort(files_arr[idx], kind="stable")]
        name = _class_key(c, class_names)
        if len(idx) <= train_per_class:
            raise ValueError(
                f"tfds split: class {name!r} has {len(idx)} images, needs more than train_per_class={train_per_class}"
            )
        pick = np.zeros(len(idx), bool)
        pick[_draw(len(idx), train_per_class, seed, name)] = True
        train.append(idx[pick])
        test.append(idx[~pick])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def carve_validation(
    train_indices: np.ndarray,
    labels: np.ndarray,
    val_fraction: float,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``train_indices`` into (train, val), both in the order of ``train_indices``.

    ``ceil(val_fraction * n)`` images are allocated to the classes in proportion to their
    training counts (scikit-learn's largest-remainder rule, ties broken by the seed), each class
    keeping at least one training image; a class's share is drawn from its sorted indices by
    ``np.random.default_rng([seed, crc32(class key)])``, as in :func:`tfds_split`. Unlike the
    test split, classes may get no validation image, so small datasets can still be carved.
    """
    train_indices = np.asarray(train_indices, np.int64)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    y = np.asarray(labels)[train_indices]
    classes, counts = np.unique(y, return_counts=True)
    n_val = math.ceil(val_fraction * y.size)
    take = np.minimum(_approximate_mode(counts, n_val, np.random.RandomState(seed)), counts - 1)
    if take.sum() == 0:
        raise ValueError(
            f"val_fraction={val_fraction}: no class has 2 training images to carve a validation split from"
        )
    is_val = np.zeros(y.size, bool)
    for c, k in zip(classes, take, strict=True):
        pos = np.flatnonzero(y == c)
        pos = pos[np.argsort(train_indices[pos], kind="stable")]
        is_val[pos[_draw(pos.size, int(k), seed, _class_key(c, class_names))]] = True
    return train_indices[~is_val], train_indices[is_val]


def fold_validation(
    train_indices: np.ndarray,
    labels: np.ndarray,
    folds: int,
    fold: int,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``train_indices`` into (train, val) where val is fold ``fold`` of ``folds``, both
    in the order of ``train_indices``.

    Each class's images (sorted, then shuffled by ``default_rng([seed, crc32(class key +
    "/folds")])``) are dealt to the folds in turn, continuing from class to class, as
    scikit-learn's ``StratifiedKFold`` balances them: a class has ``floor`` or ``ceil`` of
    ``n_c / folds`` images in each fold. The ``n % folds`` images dealt last validate in no
    fold, so every fold holds exactly ``n // folds`` images and every fold's training split
    the same number (folds then pack into one program, like seeds). The folds are disjoint;
    each image validates at most once.
    """
    train_indices = np.asarray(train_indices, np.int64)
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold={fold} of folds={folds}: need folds >= 2 and 0 <= fold < folds")
    y = np.asarray(labels)[train_indices]
    if y.size < folds:
        raise ValueError(f"folds={folds}: the training split has only {y.size} images")
    dealt = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        pos = pos[np.argsort(train_indices[pos], kind="stable")]
        dealt.append(pos[_draw(pos.size, pos.size, seed, _class_key(c, class_names) + "/folds")])
    order = np.concatenate(dealt)[: y.size - y.size % folds]
    is_val = np.zeros(y.size, bool)
    is_val[order[fold::folds]] = True
    return train_indices[~is_val], train_indices[is_val]


def assign_splits(
    cfg: dict[str, Any],
    labels: np.ndarray,
    files: Sequence[str],
    class_names: Sequence[str],
    *,
    predefined_train: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Indices of every listed file per split (``train``, ``val`` when ``val_fraction > 0``,
    ``test``) under the data config ``cfg``: with ``folds``, the validation split is fold
    ``fold`` of the training split (:func:`fold_validation`) and ``val_fraction`` is unused.

    Depends only on the sorted file list, its labels and the split fields, never on which
    images decode, so an unreadable file cannot move any other file to another split. The
    validation split comes out of the training split only: the test split does not depend on
    ``val_fraction``. ``predefined_train`` marks a source's own training images (tfds).
    """
    names = list(class_names)
    if cfg["split"] == "tfds" and predefined_train is not None:
        train, test = np.flatnonzero(predefined_train), np.flatnonzero(~predefined_train)
    elif cfg["split"] == "tfds":
        train, test = tfds_split(labels, files, cfg["train_per_class"], cfg["split_seed"], names)
    else:
        train, test = stratified_split(labels, cfg["test_fraction"], cfg["split_seed"], names)
    if cfg.get("folds"):
        train, val = fold_validation(train, labels, cfg["folds"], cfg["fold"], cfg["split_seed"], names)
        return {"train": train, "val": val, "test": test}
    if not cfg["val_fraction"]:
        return {"train": train, "test": test}
    train, val = carve_validation(train, labels, cfg["val_fraction"], cfg["split_seed"], names)
    return {"train": train, "val": val, "test": test}


def class_count_table(class_names: Sequence[str], splits: dict[str, np.ndarray]) -> str:
    """A compact table of per-class counts for each split (columns packed side by side when
    there are many classes), with a total row."""
    names = list(class_names)
    split_names = list(splits)
    counts = {
        s: np.bincount(np.asarray(v, dtype=np.int64), minlength=len(names))
        for s, v in splits.items()
    }
    wname = min(max([len(n) for n in names] + [5]), 24)
    wnum = max(5, *(len(s) for s in split_names))
    head = f"{'class':<{wname}} " + " ".join(f"{s:>{wnum}}" for s in split_names)
    cells = [
        f"{n[:wname]:<{wname}} " + " ".join(f"{int(counts[s][i]):>{wnum}}" for s in split_names)
        for i, n in enumerate(names)
    ]
    ncol = 1 if len(cells) <= 12 else 3
    rows = math.ceil(len(cells) / ncol)
    width = len(head)
    lines = ["   ".join([head] * min(ncol, len(cells)))]
    for r in range(rows):
        parts = [cells[r + k * rows] for k in range(ncol) if r + k * rows < len(cells)]
        lines.append("   ".join(p.ljust(width) for p in parts).rstrip())
    lines.append(
        f"{'total':<{wname}} "
        + " ".join(f"{int(counts[s].sum()):>{wnum}}" for s in split_names)
        + f"   ({len(names)} classes)"
    )
    return "\n".join(lines)
