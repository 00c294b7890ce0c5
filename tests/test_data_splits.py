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


# --------------------------------------------------------------------------- fixed before decoding


@pytest.mark.parametrize(
    "protocol",
    [
        {"split": "stratified", "test_fraction": 0.25, "val_fraction": 0.2},
        {"split": "stratified", "test_fraction": 0.3, "val_fraction": 0.0},
        {"split": "tfds", "train_per_class": 6, "val_fraction": 0.25},
    ],
)
def test_unreadable_file_moves_no_other_file(tmp_path, protocol):
    root = testing.make_tree(tmp_path / "tree", {"a": 11, "b": 9, "c": 8})
    cfg = testing.folder_config(root, tmp_path / "cache", **protocol)
    before = D.load_dataset(cfg, verbose=False).split_files
    assert set(before) == (
        {"train", "val", "test"} if protocol["val_fraction"] else {"train", "test"}
    )
    victims = ["a/image_0004.jpg", "b/image_0001.jpg"]
    for v in victims:
        testing.truncate_file(root / v, 0.3)
    with pytest.warns(
        UserWarning, match=r"skipped 2 unreadable.*a/image_0004.jpg \((train|val|test): "
    ):
        after = D.load_dataset(cfg, verbose=False)
    assert not after.cache_hit
    for name, files in before.items():
        assert after.split_files[name] == [f for f in files if f not in victims], name
    home = {f: name for name, files in before.items() for f in files}
    assert [(s["file"], s["split"]) for s in after.manifest["skipped"]] == [
        (v, home[v]) for v in victims
    ]
    # A cache hit and an uncached load give the same split and the same record of skips.
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        cached = D.load_dataset(cfg, verbose=False)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        fresh = D.load_dataset({**cfg, "use_cache": False}, verbose=False)
    assert cached.cache_hit
    for other in (cached, fresh):
        assert other.split_files == after.split_files
        assert other.manifest["skipped"] == after.manifest["skipped"]
        np.testing.assert_array_equal(other.train.images, after.train.images)
    # Repairing the files puts them back where they were.
    for i, v in enumerate(victims):
        testing.write_image(root / v, 500 + i)
    assert D.load_dataset(cfg, verbose=False).split_files == before


def test_stratified_split_of_a_folder_equals_sklearn_on_the_file_list(tmp_path):
    sklearn_split = pytest.importorskip("sklearn.model_selection")
    root = testing.make_tree(tmp_path / "tree", {"a": 11, "b": 9, "c": 8})
    testing.truncate_file(root / "c" / "image_0002.jpg", 0.3)
    with pytest.warns(UserWarning, match="c/image_0002.jpg"):
        ds = D.load_dataset(
            testing.folder_config(root, tmp_path / "cache", test_fraction=0.25, val_fraction=0.0),
            verbose=False,
        )
    files = sorted(
        f"{c}/image_{i + 1:04d}.jpg" for c, n in {"a": 11, "b": 9, "c": 8}.items() for i in range(n)
    )
    labels = [f.split("/")[0] for f in files]
    tr, te = sklearn_split.train_test_split(files, test_size=0.25, stratify=labels, random_state=42)
    assert ds.test.files == [f for f in te if f != "c/image_0002.jpg"]
    assert ds.train.files == [f for f in tr if f != "c/image_0002.jpg"]


def _synthetic(**kw):
    cfg = {
        "source": "synthetic",
        "synthetic_num_classes": 4,
        "synthetic_per_class": 50,
        "image_size": 8,
        "classes": "all",
        "val_fraction": 0.0,
    }
    return D.load_dataset({**cfg, **kw}, verbose=False)


@pytest.mark.parametrize(
    "protocol", [{"split": "stratified"}, {"split": "tfds", "train_per_class": 30}]
)
def test_validation_split_is_stratified_seeded_and_leaves_test_alone(protocol):
    plain = _synthetic(**protocol)
    ds = _synthetic(**protocol, val_fraction=0.2)
    assert plain.val is None and plain.split_files["test"] == ds.split_files["test"]
    train, val, test = (set(ds.split_files[k]) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val == set(plain.split_files["train"])
    assert len(val) == int(np.ceil(0.2 * len(plain.train)))
    share = ds.val.class_counts(4) / plain.train.class_counts(4)
    assert np.all(np.abs(share - 0.2) <= 1 / plain.train.class_counts(4).min() + 1e-9)
    assert _synthetic(**protocol, val_fraction=0.2).split_files == ds.split_files
    other = _synthetic(**protocol, val_fraction=0.2, split_seed=7)
    assert other.split_files["val"] != ds.split_files["val"]
    # The validation split does not depend on images that are only in other splits' classes.
    y = np.repeat(np.arange(3), [20, 20, 20])
    names = ["x", "y", "z"]
    tr = np.arange(60)
    _, va = D.carve_validation(tr, y, 0.1, 42, names)
    _, va_sub = D.carve_validation(tr[:40], y, 0.1, 42, names)
    assert set(va[y[va] < 2]) == set(va_sub)


def test_validation_carve_on_tiny_classes():
    y = np.repeat(np.arange(3), [3, 3, 1])
    tr, va = D.carve_validation(np.arange(7), y, 0.1, 0)
    assert len(va) == 1 and np.all(np.bincount(y[tr], minlength=3) >= 1)
    with pytest.raises(ValueError, match="val_fraction=0.5"):
        D.carve_validation(np.arange(2), np.array([0, 1]), 0.5, 0)


def test_validation_folds_are_disjoint_equal_stratified_and_seeded():
    y = np.repeat(np.arange(5), [31, 50, 47, 13, 2])
    idx = np.random.default_rng(0).permutation(len(y) + 40)[: len(y)]  # a training split's indices
    labels = np.zeros(idx.max() + 1, np.int32)
    labels[idx] = y
    k = 4
    folds = [D.fold_validation(idx, labels, k, j, seed=3) for j in range(k)]
    for train, val in folds:
        assert len(val) == len(y) // k and len(train) == len(y) - len(y) // k
        assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).size == len(y)
        # in the order of the training split's indices, as the validation carve
        assert (np.argsort([list(idx).index(i) for i in val]) == np.arange(len(val))).all()
    vals = np.concatenate([v for _, v in folds])
    assert np.unique(vals).size == vals.size == len(y) - len(y) % k  # each image validates at most once
    counts = np.stack([np.bincount(labels[v], minlength=5) for _, v in folds])
    per_class = np.bincount(y)
    # each class has floor or ceil of n_c / k images in each fold (the undealt tail aside)
    assert (counts >= per_class // k - 1).all() and (counts <= -(-per_class // k)).all()
    again = D.fold_validation(idx, labels, k, 2, seed=3)
    np.testing.assert_array_equal(again[1], folds[2][1])
    assert not np.array_equal(D.fold_validation(idx, labels, k, 2, seed=4)[1], folds[2][1])
    with pytest.raises(ValueError, match="fold=4 of folds=4"):
        D.fold_validation(idx, labels, k, 4)


@pytest.mark.parametrize("protocol", ["stratified", "tfds"])
def test_load_folds_share_the_test_split_and_replace_the_carve(protocol):
    cfg = {"source": "synthetic", "synthetic_per_class": 40, "image_size": 8, "split": protocol,
           "train_per_class": 20, "val_fraction": 0.3}
    plain = D.load_dataset(cfg, verbose=False)
    folds = D.load_folds({**cfg, "folds": 3}, [0, 1, 2], verbose=False)
    pool = np.sort(np.concatenate([plain.train.indices, plain.val.indices]))
    for j, ds in enumerate(folds):
        assert ds.test is folds[0].test  # one test split, as without folds
        np.testing.assert_array_equal(ds.test.indices, plain.test.indices)
        np.testing.assert_array_equal(np.sort(np.concatenate([ds.train.indices, ds.val.indices])), pool)
        assert len(ds.val) == len(pool) // 3  # val_fraction's carve is not used
        alone = D.load_dataset({**cfg, "folds": 3, "fold": j}, verbose=False)
        np.testing.assert_array_equal(alone.val.indices, ds.val.indices)
        np.testing.assert_array_equal(alone.train.images, ds.train.images)


@pytest.mark.parametrize("fields, match", [
    ({"folds": 1}, "data.folds.*must be 0 \\(off\\) or >= 2"),
    ({"folds": 3, "fold": 3}, "data.fold.*must be < folds=3"),
    ({"fold": 1}, "data.fold.*needs folds >= 2"),
])
def test_bad_fold_fields_are_named(fields, match):
    from cnnlab.schema import ConfigError

    with pytest.raises(ConfigError, match=match):
        D.load_dataset({"source": "synthetic", **fields}, verbose=False)
