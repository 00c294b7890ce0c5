"""Split protocols (cnnlab.data.splits) on synthetic labels and the real tree."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnnlab.data as D
from cnnlab.data import sources, testing


def _real_dir():
    d = testing.real_data_dir()
    if d is None:
        pytest.skip("CALTECH101_DIR is unset or missing: real CALTECH-101 tests skipped")
    return d


def _real_labels(classes, drop_background=False):
    root = _real_dir()
    by_class, _ = sources.scan_folder(root)
    chosen = sources.select_classes(list(by_class), classes, drop_background)
    labels = np.concatenate([np.full(len(by_class[c]), i) for i, c in enumerate(chosen)]).astype(
        np.int32
    )
    files = [e.rel for c in chosen for e in by_class[c]]
    return chosen, labels, files


def test_stratified_matches_sklearn_exactly():
    sklearn_split = pytest.importorskip("sklearn.model_selection")
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(60):
        k = int(rng.integers(2, 9))
        y = rng.integers(0, k, int(rng.integers(40, 300)))
        if np.bincount(y).min() < 2:
            continue
        ts = float(rng.choice([0.1, 0.2, 0.25, 0.3, 0.5]))
        seed = int(rng.integers(0, 1000))
        a, b = sklearn_split.train_test_split(
            np.arange(len(y)), test_size=ts, stratify=y, random_state=seed
        )
        c, d = D.stratified_split(y, ts, seed)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        checked += 1
    assert checked > 30


def test_stratified_properties():
    y = np.repeat(np.arange(4), [435, 200, 798, 800])  # the tutorial's class sizes
    tr, te = D.stratified_split(y, 0.25, 42)
    assert len(te) == 559 and len(tr) == 1674
    assert np.intersect1d(tr, te).size == 0 and np.union1d(tr, te).size == len(y)
    assert np.bincount(y[te]).tolist() == [109, 50, 200, 200]
    tr2, te2 = D.stratified_split(y, 0.25, 42)
    np.testing.assert_array_equal(te, te2)
    _, te3 = D.stratified_split(y, 0.25, 7)
    assert not np.array_equal(np.sort(te), np.sort(te3))
    with pytest.raises(ValueError, match="fewer than 2"):
        D.stratified_split(np.array([0, 0, 0, 1]), 0.5, 0, class_names=["a", "lonely"])


def test_tfds_split_counts_determinism_and_stability():
    y = np.repeat(np.arange(3), [40, 31, 60])
    files = [f"c{c}/img_{i:04d}.jpg" for c, n in enumerate([40, 31, 60]) for i in range(n)]
    names = ["a", "b", "c"]
    tr, te = D.tfds_split(y, files, 30, 42, names)
    assert np.bincount(y[tr]).tolist() == [30, 30, 30]
    assert np.bincount(y[te]).tolist() == [10, 1, 30]
    tr2, _ = D.tfds_split(y, files, 30, 42, names)
    np.testing.assert_array_equal(tr, tr2)
    # A class's draw does not depend on which other classes are selected.
    sub = y != 0
    sub_idx = np.flatnonzero(sub)
    tr_sub, _ = D.tfds_split(
        y[sub] - 1, [f for f, s in zip(files, sub, strict=True) if s], 30, 42, names[1:]
    )
    np.testing.assert_array_equal(sub_idx[tr_sub], tr[y[tr] != 0])
    with pytest.raises(ValueError, match="'b' has 31 images"):
        D.tfds_split(y, files, 31, 42, names)


def test_validation_carve_is_stratified():
    y = np.repeat(np.arange(3), [100, 60, 40])
    tr, te = D.stratified_split(y, 0.25, 42)
    tr2, va = D.carve_validation(tr, y, 0.2, 42)
    assert len(va) == int(np.ceil(0.2 * len(tr))) and len(tr2) + len(va) == len(tr)
    assert np.intersect1d(va, te).size == 0 and np.intersect1d(va, tr2).size == 0
    frac = np.bincount(y[va], minlength=3) / np.bincount(y[tr], minlength=3)
    assert np.all(np.abs(frac - 0.2) < 0.05)


def test_load_dataset_with_validation(tmp_path):
    cfg = {
        "source": "synthetic",
        "synthetic_num_classes": 3,
        "synthetic_per_class": 40,
        "image_size": 8,
        "classes": "all",
        "val_fraction": 0.2,
    }
    ds = D.load_dataset(cfg, verbose=False)
    assert ds.val is not None
    assert (
        len(ds.train) + len(ds.val) + len(ds.test) == 120
        and len(ds.test) == 30
        and len(ds.val) == 18
    )
    all_idx = np.concatenate([ds.train.indices, ds.val.indices, ds.test.indices])
    assert np.unique(all_idx).size == 120
    table = ds.summary()
    assert "train" in table and "val" in table and "test" in table and "total" in table


def test_class_count_table_is_compact():
    names = [f"class_{i:03d}" for i in range(30)]
    y = np.arange(300) % 30
    table = D.class_count_table(names, {"train": y, "test": y[:60]})
    lines = table.splitlines()
    assert len(lines) == 1 + 10 + 1  # header, 30 classes in 3 columns, total
    assert lines[-1].split()[:3] == ["total", "300", "60"]


# --------------------------------------------------------------------------- real tree


def test_real_tutorial4_stratified_sizes():
    names, labels, _ = _real_labels("tutorial4")
    assert names == ["Faces", "Leopards", "Motorbikes", "airplanes"]
    assert labels.size == 2233
    tr, te = D.stratified_split(labels, 0.25, 42)
    assert len(te) == 559 and len(tr) == 1674
    assert np.bincount(labels[te]).tolist() == [109, 50, 200, 200]


def test_real_tfds_protocol_sizes():
    names, labels, files = _real_labels("all")
    assert len(names) == 102
    tr, te = D.tfds_split(labels, files, 30, 42, names)
    assert (len(tr), len(te)) == (3060, 6084)
    assert set(np.bincount(labels[tr]).tolist()) == {30}
    names, labels, files = _real_labels("all", drop_background=True)
    tr, te = D.tfds_split(labels, files, 30, 42, names)
    assert len(names) == 101 and (len(tr), len(te)) == (3030, 5647)


def test_save_classes(tmp_path):
    ds = D.load_dataset(
        {
            "source": "synthetic",
            "synthetic_num_classes": 3,
            "synthetic_per_class": 8,
            "image_size": 8,
        },
        verbose=False,
    )  # the default preset means "all" for the synthetic source
    assert ds.num_classes == 3
    ds.save_classes(tmp_path / "classes.json")
    assert json.loads((tmp_path / "classes.json").read_text()) == ds.class_names
