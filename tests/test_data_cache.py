"""The prepared-array cache: hits, stale and damaged rebuilds, atomic layout."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

import cnnlab.data as D
from cnnlab.data import cache, testing


def _cfg(tmp_path, root, **kw):
    return testing.folder_config(
        root, tmp_path / "cache", **{"image_size": 12, "test_fraction": 0.3, **kw}
    )


@pytest.fixture
def tree(tmp_path):
    return testing.make_tree(tmp_path / "tree", {"a": 6, "b": 6})


def _total(ds):
    return sum(len(s) for s in ds.splits().values())


def _image_of(ds, name):
    (image,) = [s.images[s.files.index(name)] for s in ds.splits().values() if name in s.files]
    return image


def _prepared_dirs(tmp_path):
    d = tmp_path / "cache" / "prepared"
    return sorted(p for p in d.iterdir()) if d.exists() else []


def test_cache_hit_returns_identical_data(tmp_path, tree):
    first = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert not first.cache_hit
    second = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert second.cache_hit and second.cache_path == first.cache_path
    np.testing.assert_array_equal(first.train.images, second.train.images)
    np.testing.assert_array_equal(first.test.labels, second.test.labels)
    assert second.train.files == first.train.files
    # Layout: memory-mappable npy + manifest + classes, no temp dirs left behind.
    d = first.cache_path
    assert sorted(p.name for p in d.iterdir()) == [
        "classes.json",
        "images.npy",
        "labels.npy",
        "manifest.json",
    ]
    assert json.loads((d / "classes.json").read_text()) == ["a", "b"]
    assert isinstance(np.load(d / "images.npy", mmap_mode="r"), np.memmap)
    manifest = json.loads((d / "manifest.json").read_text())
    assert (
        manifest["key"] == d.name
        and manifest["num_images"] == 12
        and manifest["image_shape"] == [12, 12, 3]
    )
    assert manifest["checksums"]["images"].startswith("full:")
    assert [p.name for p in _prepared_dirs(tmp_path)] == [d.name]


def test_preprocessing_options_change_the_key(tmp_path, tree):
    a = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    b = D.load_dataset(_cfg(tmp_path, tree, resize="pad"), verbose=False)
    c = D.load_dataset(_cfg(tmp_path, tree, image_size=10), verbose=False)
    assert len({a.cache_path, b.cache_path, c.cache_path}) == 3
    # Split options do not: the same prepared arrays serve every split.
    d = D.load_dataset(_cfg(tmp_path, tree, split_seed=3, test_fraction=0.5), verbose=False)
    assert d.cache_hit and d.cache_path == a.cache_path


def test_stale_cache_is_rebuilt_when_a_file_changes(tmp_path, tree):
    first = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    target = tree / "a" / "image_0001.jpg"
    testing.write_image(target, 999, (30, 20))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert not second.cache_hit and second.cache_path != first.cache_path
    fresh = D.load_dataset(_cfg(tmp_path, tree, use_cache=False), verbose=False)
    np.testing.assert_array_equal(
        _image_of(second, "a/image_0001.jpg"), _image_of(fresh, "a/image_0001.jpg")
    )
    assert not np.array_equal(
        _image_of(first, "a/image_0001.jpg"), _image_of(second, "a/image_0001.jpg")
    )
    # Adding a file also gives a new key.
    testing.write_image(tree / "b" / "image_0100.jpg", 5)
    third = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert not third.cache_hit and _total(third) == 13


def test_unreadable_file_keeps_a_row_in_the_cache(tmp_path, tree):
    testing.truncate_file(tree / "b" / "image_0002.jpg", 0.3)
    with pytest.warns(UserWarning, match="b/image_0002.jpg"):
        ds = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    manifest = json.loads((ds.cache_path / "manifest.json").read_text())
    assert manifest["num_images"] == 12 and len(manifest["files"]) == 12
    assert [s["file"] for s in manifest["skipped"]] == ["b/image_0002.jpg"]
    row = manifest["files"].index("b/image_0002.jpg")
    assert not np.load(ds.cache_path / "images.npy")[row].any()
    assert _total(ds) == 11
    # The cache serves every split setting; the dataset's manifest says where the file was.
    assert "split" not in manifest["skipped"][0]
    assert ds.manifest["skipped"][0]["split"] in ("train", "test")


def test_stale_manifest_key_is_rebuilt(tmp_path, tree):
    first = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    mpath = first.cache_path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["format_version"] = 0
    mpath.write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="format version"):
        second = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert not second.cache_hit
    assert D.load_dataset(_cfg(tmp_path, tree), verbose=False).cache_hit


@pytest.mark.parametrize(
    "damage", ["flip_byte", "truncate_npy", "delete_labels", "bad_json", "classes"]
)
def test_damaged_cache_is_rebuilt(tmp_path, tree, damage):
    first = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    d = first.cache_path
    if damage == "flip_byte":
        raw = bytearray((d / "images.npy").read_bytes())
        raw[-100] ^= 0xFF
        (d / "images.npy").write_bytes(bytes(raw))
    elif damage == "truncate_npy":
        testing.truncate_file(d / "images.npy", 0.7)
    elif damage == "delete_labels":
        (d / "labels.npy").unlink()
    elif damage == "bad_json":
        (d / "manifest.json").write_text("{not json")
    else:
        (d / "classes.json").write_text('["b", "a"]')
    with pytest.warns(UserWarning, match="rebuilding the data cache"):
        second = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert not second.cache_hit and second.cache_path == d
    np.testing.assert_array_equal(first.train.images, second.train.images)
    third = D.load_dataset(_cfg(tmp_path, tree), verbose=False)
    assert third.cache_hit
    assert not [p for p in (tmp_path / "cache" / "prepared").iterdir() if p.name.startswith(".")]


def test_sampled_checksum_mode(tmp_path, tree):
    first = D.load_dataset(_cfg(tmp_path, tree, cache_verify="sample"), verbose=False)
    m = json.loads((first.cache_path / "manifest.json").read_text())
    assert m["checksums"]["images"].startswith("full:")  # small arrays are always hashed fully
    big = np.random.default_rng(0).integers(0, 255, (64, 96, 96, 3), dtype=np.uint8)
    s = cache.array_checksum(big, "sample")
    assert s.startswith("sample:") and s == cache.array_checksum(big.copy(), "sample")
    big[0, 0, 0, 0] ^= 1  # the first block is always sampled
    assert cache.array_checksum(big, "sample") != s


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "env_cache"))
    assert D.cache_root(None) == tmp_path / "env_cache"
    assert D.cache_root(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("CNNLAB_CACHE_DIR")
    assert str(D.cache_root(None)).endswith(os.path.join(".cache", "cnnlab"))


def test_env_cache_dir_is_used(tmp_path, tree, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "env_cache"))
    cfg = _cfg(tmp_path, tree)
    cfg["cache_dir"] = None
    ds = D.load_dataset(cfg, verbose=False)
    assert str(ds.cache_path).startswith(str(tmp_path / "env_cache"))


# --------------------------------------------------------------------------- real data (slow)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    root = testing.real_data_dir()
    if root is None:
        pytest.skip("CALTECH101_DIR is unset or missing: real CALTECH-101 tests skipped")
    return root, tmp_path_factory.mktemp("real_cache")


@pytest.mark.slow
def test_real_tutorial4_prepare_and_cache(real_cache):
    root, cdir = real_cache
    cfg = {"data_dir": str(root), "cache_dir": str(cdir), "classes": "tutorial4"}
    ds = D.load_dataset(cfg, verbose=False)
    assert _total(ds) == 2233 and len(ds.test) == 559
    assert ds.train.images.shape[1:] == (96, 96, 3)
    assert ds.class_names == ["Faces", "Leopards", "Motorbikes", "airplanes"]
    t0 = time.perf_counter()
    again = D.load_dataset(cfg, verbose=False)
    assert again.cache_hit and time.perf_counter() - t0 < 2.0
    np.testing.assert_array_equal(ds.test.labels, again.test.labels)


@pytest.mark.slow
def test_real_full_tree_tfds_protocol(real_cache):
    root, cdir = real_cache
    cfg = {"data_dir": str(root), "cache_dir": str(cdir), "classes": "all", "split": "tfds"}
    ds = D.load_dataset(cfg, verbose=False)
    assert ds.num_classes == 102 and (_total(ds) - len(ds.test), len(ds.test)) == (3060, 6084)
    assert (
        ds.manifest["ignored_non_jpg"] == ["BACKGROUND_Google/tmp"] and ds.manifest["skipped"] == []
    )
    car = ds.class_names.index("car_side")  # every car_side image is grayscale
    imgs = ds.train.images[ds.train.labels == car].astype(int)
    assert np.array_equal(imgs[..., 0], imgs[..., 1]) and np.array_equal(imgs[..., 1], imgs[..., 2])
    t0 = time.perf_counter()
    again = D.load_dataset(cfg, verbose=False)
    assert again.cache_hit and time.perf_counter() - t0 < 3.0
    np.testing.assert_array_equal(ds.train.indices, again.train.indices)
