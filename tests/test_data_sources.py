"""Data sources and preprocessing (cnnlab.data; the data config is tested in test_schema.py)."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
from PIL import Image

import cnnlab.data as D
from cnnlab.data import sources, testing
from cnnlab.data._decode import load_image, resize_image


def _cfg(tmp_path, data_dir, **kw):
    return testing.folder_config(data_dir, tmp_path / "cache", **{"image_size": 16, **kw})


def _total(ds):
    return sum(len(s) for s in ds.splits().values())


def _real_dir():
    d = testing.real_data_dir()
    if d is None:
        pytest.skip("CALTECH101_DIR is unset or missing: real CALTECH-101 tests skipped")
    return d


# --------------------------------------------------------------------------- folder source


def test_folder_source_small_tree(tmp_path):
    root = testing.make_tree(tmp_path / "tree")
    ds = D.load_dataset(_cfg(tmp_path, root), verbose=False)
    assert ds.class_names == ["Beta", "alpha", "gamma"]  # sorted, case-sensitive
    assert _total(ds) == 19
    assert len(ds.test) == 5  # ceil(0.25 * 19)
    for split in ds.splits().values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (16, 16, 3)
        assert split.labels.dtype == np.int32
        assert len(split.files) == len(split)
    assert (ds.cache_path / "classes.json").exists()
    assert ds.manifest["class_names"] == ds.class_names


def test_env_var_locates_data(tmp_path, monkeypatch):
    root = testing.make_tree(tmp_path / "tree", {"a": 4, "b": 4})
    cfg = _cfg(tmp_path, root)
    cfg["data_dir"] = None
    monkeypatch.setenv("CALTECH101_DIR", str(root))
    assert D.load_dataset(cfg, verbose=False).num_classes == 2
    monkeypatch.delenv("CALTECH101_DIR")
    with pytest.raises(FileNotFoundError, match="CALTECH101_DIR"):
        D.load_dataset(cfg, verbose=False)


def test_parent_folder_with_101_ObjectCategories(tmp_path):
    testing.make_tree(tmp_path / "caltech101" / "101_ObjectCategories", {"a": 4, "b": 4})
    ds = D.load_dataset(_cfg(tmp_path, tmp_path / "caltech101"), verbose=False)
    assert ds.class_names == ["a", "b"]


def test_non_jpg_is_excluded_and_modes_become_rgb(tmp_path):
    root = testing.make_tree(tmp_path / "tree", {"a": 4, "b": 4})
    # A real JPEG without the .jpg suffix, like BACKGROUND_Google/tmp: ignored.
    testing.write_image(root / "a" / "tmp", 1)
    (root / "b" / "notes.txt").write_text("not an image")
    # Grayscale, CMYK JPEGs, and palette/RGBA PNG content behind a .jpg name: converted.
    testing.write_image(root / "a" / "gray.jpg", 2, mode="L")
    testing.write_image(root / "a" / "cmyk.jpg", 3, mode="CMYK")
    testing.write_image(root / "b" / "palette.jpg", 4, mode="P", fmt="PNG")
    testing.write_image(root / "b" / "rgba.jpg", 5, mode="RGBA", fmt="PNG")
    ds = D.load_dataset(_cfg(tmp_path, root), verbose=False)
    files = set().union(*ds.split_files.values())
    assert "a/tmp" not in files and "b/notes.txt" not in files
    assert {"a/gray.jpg", "a/cmyk.jpg", "b/palette.jpg", "b/rgba.jpg"} <= files
    assert ds.manifest["ignored_non_jpg"] == ["a/tmp", "b/notes.txt"]
    for split in ds.splits().values():
        if "a/gray.jpg" in split.files:
            img = split.images[split.files.index("a/gray.jpg")].astype(int)
            assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(
                img[..., 1], img[..., 2]
            )


def test_truncated_jpeg_is_skipped_with_warning(tmp_path):
    root = testing.make_tree(tmp_path / "tree", {"a": 5, "b": 5}, size=(64, 48))
    testing.truncate_file(root / "a" / "image_0002.jpg", 0.4)
    (root / "b" / "image_0003.jpg").write_bytes(b"garbage, not a jpeg")
    with pytest.warns(
        UserWarning, match=r"skipped 2 unreadable image\(s\).*a/image_0002.jpg.*b/image_0003.jpg"
    ):
        ds = D.load_dataset(_cfg(tmp_path, root), verbose=False)
    assert _total(ds) == 8
    skipped = [s["file"] for s in ds.manifest["skipped"]]
    assert skipped == ["a/image_0002.jpg", "b/image_0003.jpg"]
    # The summary line reports the count.
    assert "a/image_0002.jpg" not in set().union(*ds.split_files.values())


def test_empty_class_folder_raises(tmp_path):
    root = testing.make_tree(tmp_path / "tree", {"a": 4, "b": 4})
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"empty class folder.*empty_class"):
        D.load_dataset(_cfg(tmp_path, root), verbose=False)
    # Not selected -> no error.
    ds = D.load_dataset(_cfg(tmp_path, root, classes=["a", "b"]), verbose=False)
    assert ds.class_names == ["a", "b"]


def test_missing_dir_and_zero_images_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        D.load_dataset(_cfg(tmp_path, tmp_path / "does_not_exist"), verbose=False)
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        D.load_dataset(_cfg(tmp_path, tmp_path / "flat"), verbose=False)
    root = testing.make_tree(tmp_path / "bad", {"a": 0, "b": 0})
    for name in ("a", "b"):
        for i in range(3):
            (root / name / f"x{i}.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="zero readable images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D.load_dataset(_cfg(tmp_path, root), verbose=False)


def test_class_selection_and_cap(tmp_path):
    root = testing.make_tree(tmp_path / "tree", {"a": 6, "b": 6, "BACKGROUND_Google": 4, "c": 3})
    ds = D.load_dataset(
        _cfg(tmp_path, root, drop_background=True, max_per_class=4, test_fraction=0.5),
        verbose=False,
    )
    assert ds.class_names == ["a", "b", "c"]
    counts = np.bincount(np.concatenate([s.labels for s in ds.splits().values()]))
    assert counts.tolist() == [4, 4, 3]
    assert sorted(f for f in set().union(*ds.split_files.values()) if f.startswith("a/")) == [
        f"a/image_{i:04d}.jpg" for i in range(1, 5)
    ]
    with pytest.raises(ValueError, match="zebra"):
        D.load_dataset(_cfg(tmp_path, root, classes=["a", "zebra"]), verbose=False)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_is_extracted_once(tmp_path, kind):
    root = testing.make_tree(tmp_path / "tree", {"a": 4, "b": 4})
    archive = testing.make_tar_gz(root, tmp_path / "101_ObjectCategories.tar.gz")
    if kind == "zip":
        archive = testing.make_caltech_zip(archive, tmp_path / "caltech-101.zip")
    ds = D.load_dataset(_cfg(tmp_path, archive), verbose=False)
    assert ds.class_names == ["a", "b"]
    extracted = list((tmp_path / "cache" / "extracted").iterdir())
    assert len(extracted) == 1 and not extracted[0].name.startswith(".tmp")
    ds2 = D.load_dataset(_cfg(tmp_path, archive), verbose=False)
    assert ds2.cache_hit
    np.testing.assert_array_equal(ds.train.images, ds2.train.images)


def test_resize_modes():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue left quarter
    stretch = np.asarray(resize_image(im, 10, 10, "stretch"))
    crop = np.asarray(resize_image(im, 10, 10, "crop"))
    pad = np.asarray(resize_image(im, 10, 10, "pad", pad_value=7))
    assert stretch.shape == crop.shape == pad.shape == (10, 10, 3)
    assert stretch[5, 0].tolist() == [0, 0, 255]  # the left quarter survives a stretch
    assert crop[5, 0, 0] > 200 and crop[5, 0, 2] < 50  # center crop cut it off
    assert pad[0, 5].tolist() == [7, 7, 7] and pad[9, 5].tolist() == [7, 7, 7]  # letterbox rows
    assert pad[5, 0].tolist() == [0, 0, 255] and pad[5, 9].tolist() == [255, 0, 0]


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_shaped(tmp_path):
    cfg = {
        "source": "synthetic",
        "synthetic_num_classes": 5,
        "synthetic_per_class": 12,
        "image_size": 24,
        "classes": "all",
    }
    a = D.load_dataset(cfg, verbose=False)
    b = D.load_dataset(cfg, verbose=False)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert a.num_classes == 5 and a.class_names == sorted(a.class_names)
    assert _total(a) == 60 and a.train.images.shape[1:] == (24, 24, 3)
    c = D.load_dataset({**cfg, "synthetic_seed": 1}, verbose=False)
    assert not np.array_equal(a.train.images, c.train.images)
    # Classes differ visibly: mean colours of two classes are far apart.
    imgs, labels, names, _ = D.make_synthetic(5, 12, 24, 24, 0)
    means = np.stack([imgs[labels == k].reshape(-1, 3).mean(0) for k in range(5)])
    assert np.min(np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(5, dtype=bool)]) > 5
    tfds_like = D.load_dataset({**cfg, "split": "tfds", "train_per_class": 10}, verbose=False)
    assert _total(tfds_like) - len(tfds_like.test) == 50  # train (and val)


# --------------------------------------------------------------------------- tfds


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r'pip install "cnnlab\[tfds\]"'):
        D.load_dataset({"source": "tfds"}, verbose=False)


def _fake_tfds(names, examples, prepared=True):
    class Split:
        num_examples = len(examples)

    class Info:
        splits = {"train": Split()} if prepared else {}
        features = {"label": types.SimpleNamespace(names=names)}

    class Builder:
        info = Info()
        prepared_with = None

        def download_and_prepare(self, **kw):
            Builder.prepared_with = kw

        def as_dataset(self, split):
            return [e for e in examples if e["split"] == split]

    mod = types.ModuleType("tensorflow_datasets")
    mod.builder = lambda name, data_dir=None: Builder()
    mod.as_numpy = lambda ds: ds
    mod.download = types.SimpleNamespace(DownloadConfig=lambda **kw: kw)
    return mod, Builder


def test_tfds_source_structure_with_fake_module(monkeypatch):
    names = ["airplanes", "faces", "leopards"]
    rng = np.random.default_rng(0)
    examples = []
    for li, n in enumerate(names):
        for i in range(6):
            img = rng.integers(0, 256, (20 + i, 30, 1 if n == "faces" else 3), dtype=np.uint8)
            examples.append(
                {
                    "image": img,
                    "label": li,
                    "image/file_name": f"image_{i:04d}.jpg".encode(),
                    "split": "train" if i < 2 else "test",
                }
            )
    mod, _ = _fake_tfds(names, examples)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", mod)
    cfg = {"source": "tfds", "classes": ["Faces", "Leopards"], "split": "tfds", "image_size": 8}
    ds = D.load_dataset({**cfg, "val_fraction": 0.0}, verbose=False)
    assert ds.class_names == ["faces", "leopards"]
    assert len(ds.train) == 4 and len(ds.test) == 8  # tfds' own split
    assert ds.train.images.shape == (4, 8, 8, 3) and ds.train.images.dtype == np.uint8
    assert all(f.split("/")[0] in ("faces", "leopards") for f in ds.train.files)
    # A validation split comes out of tfds' training images; tfds' test split stays.
    with_val = D.load_dataset({**cfg, "val_fraction": 0.25}, verbose=False)
    assert with_val.split_files["test"] == ds.split_files["test"] and len(with_val.val) == 1
    assert set(with_val.split_files["train"]) | set(with_val.split_files["val"]) == set(
        ds.split_files["train"]
    )
    strat = D.load_dataset(
        {"source": "tfds", "classes": "all", "image_size": 8, "test_fraction": 0.5}, verbose=False
    )
    assert _total(strat) == 18 and len(strat.test) == 9


def test_tfds_unprepared_without_download_raises(monkeypatch):
    mod, builder = _fake_tfds(["a"], [], prepared=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", mod)
    with pytest.raises(FileNotFoundError, match="tfds_download"):
        D.load_dataset({"source": "tfds", "classes": "all"}, verbose=False)


# --------------------------------------------------------------------------- real data (fast parts)


def test_real_tree_listing():
    root = _real_dir()
    by_class, ignored = sources.scan_folder(root)
    assert len(by_class) == 102
    assert sum(len(v) for v in by_class.values()) == 9144
    assert ignored == ["BACKGROUND_Google/tmp"]
    assert len(by_class["BACKGROUND_Google"]) == 467
    tut = sources.select_classes(list(by_class), "tutorial4", False)
    assert tut == ["Faces", "Leopards", "Motorbikes", "airplanes"]
    assert [len(by_class[c]) for c in tut] == [435, 200, 798, 800]


def test_real_grayscale_images_decode_to_rgb():
    root = _real_dir()
    files = sorted((root / "car_side").glob("*.jpg"))[:3]
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "L"
        arr = load_image(str(f), 32, 32)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
        assert np.array_equal(arr[..., 0], arr[..., 2])
