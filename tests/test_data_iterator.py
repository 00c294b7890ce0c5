"""Epoch iterators, device sharding and prefetch (cnnlab.data)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import cnnlab.data as D


def _arrays(n=50, hw=4):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, hw, hw, 3), np.uint8)
    labels = (np.arange(n) % 7).astype(np.int32)
    return images, labels


def _ids(batch):
    return batch["image"][:, 0, 0, 0].astype(int)


def test_batch_structure():
    images, labels = _arrays()
    b = next(D.iterate_epoch(images, labels, 8, seed=0))
    assert set(b) == {"image", "label", "mask"}
    assert b["image"].shape == (8, 4, 4, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    assert b["mask"].shape == (8,) and b["mask"].dtype == bool and b["mask"].all()
    np.testing.assert_array_equal(b["label"], labels[_ids(b)])


def test_shuffle_is_deterministic_per_seed_and_epoch():
    images, labels = _arrays()

    def run(seed, epoch):
        return np.concatenate(
            [_ids(b) for b in D.iterate_epoch(images, labels, 8, seed=seed, epoch=epoch)]
        )

    a, b = run(1, 0), run(1, 0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 48 and len(set(a.tolist())) == 48  # drop_remainder: 6 full batches, no repeats
    assert not np.array_equal(a, run(1, 1)) and not np.array_equal(a, run(2, 0))
    np.testing.assert_array_equal(D.epoch_order(50, 1, 0)[:48], a)


def test_resume_equals_tail_of_uninterrupted_epoch():
    images, labels = _arrays(103)
    full = list(D.iterate_epoch(images, labels, 10, seed=5, epoch=3))
    for start in (0, 1, 4, 9, 10):
        tail = list(D.iterate_epoch(images, labels, 10, seed=5, epoch=3, start_step=start))
        assert len(tail) == len(full) - start
        for x, y in zip(tail, full[start:], strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="start_step"):
        next(D.iterate_epoch(images, labels, 10, start_step=11))


def test_resume_does_not_touch_earlier_batches():
    images, labels = _arrays(40)

    class Spy(np.ndarray):
        touched: list = []

        def __getitem__(self, idx):
            Spy.touched.append(np.asarray(idx).copy())
            return np.asarray(self).__getitem__(idx)

    spy = images.view(Spy)
    order = D.epoch_order(40, 0, 0)
    list(D.iterate_epoch(spy, labels, 8, seed=0, start_step=3))
    touched = np.concatenate([np.atleast_1d(t) for t in Spy.touched])
    assert set(touched.tolist()) <= set(order[24:].tolist())


def test_eval_iterator_counts_every_image_once():
    images, labels = _arrays(53)
    batches = list(D.iterate_epoch(images, labels, 16, shuffle=False, drop_remainder=False))
    assert len(batches) == 4 and all(b["image"].shape[0] == 16 for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([_ids(b) for b in batches])[masks]
    assert masks.sum() == 53 and sorted(ids.tolist()) == list(range(53))
    last = batches[-1]
    assert last["mask"].tolist() == [True] * 5 + [False] * 11
    assert (last["image"][5:] == 0).all() and (last["label"][5:] == 0).all()
    # Shuffled eval also covers each image exactly once.
    sh = list(D.iterate_epoch(images, labels, 16, shuffle=True, seed=3, drop_remainder=False))
    ids = np.concatenate([_ids(b)[b["mask"]] for b in sh])
    assert sorted(ids.tolist()) == list(range(53))
    assert D.num_batches(53, 16, False) == 4 and D.num_batches(53, 16, True) == 3


def test_train_stream_resumes_across_epochs():
    images, labels = _arrays(30)
    ref = list(itertools.islice(D.iterate_train(images, labels, 8, seed=2), 10))  # 3 steps/epoch
    resumed = list(itertools.islice(D.iterate_train(images, labels, 8, seed=2, start_step=4), 6))
    for x, y in zip(resumed, ref[4:], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    first_epoch = np.concatenate([_ids(b) for b in ref[:3]])
    np.testing.assert_array_equal(first_epoch, D.epoch_order(30, 2, 0)[:24])
    assert len(list(D.iterate_train(images, labels, 8, seed=2, num_epochs=2))) == 6


def test_dataset_batches_helpers():
    ds = D.load_dataset(
        {
            "source": "synthetic",
            "synthetic_num_classes": 3,
            "synthetic_per_class": 10,
            "image_size": 8,
            "classes": "all",
        },
        verbose=False,
    )
    ev = list(ds.test.batches(4))
    assert sum(int(b["mask"].sum()) for b in ev) == len(ds.test) == 8
    assert ds.steps_per_epoch(5) == len(ds.train) // 5
    tr = list(itertools.islice(ds.train_batches(5, seed=0), 3))
    assert all(b["image"].shape == (5, 8, 8, 3) for b in tr)


def test_shard_batch_and_prefetch():
    images, labels = _arrays(24)
    n_dev = jax.device_count()
    sharding = D.batch_sharding()
    batches = list(D.iterate_epoch(images, labels, 4 * n_dev, shuffle=False))
    on_dev = D.shard_batch(batches[0], sharding)
    assert isinstance(on_dev["image"], jax.Array)
    assert on_dev["image"].sharding.is_equivalent_to(sharding, 4)
    np.testing.assert_array_equal(np.asarray(on_dev["image"]), batches[0]["image"])
    got = list(D.prefetch_to_device(iter(batches), size=2))
    assert len(got) == len(batches)
    for g, b in zip(got, batches, strict=True):
        np.testing.assert_array_equal(np.asarray(g["label"]), b["label"])
    if n_dev > 1:
        with pytest.raises(ValueError, match="does not split"):
            D.shard_batch({"x": np.zeros((n_dev + 1, 2))}, sharding)


_TWO_DEVICE_SCRIPT = """
import numpy as np, jax
import cnnlab.data as D
assert jax.device_count() == 2, jax.devices()
images = np.arange(8 * 4 * 4 * 3, dtype=np.uint8).reshape(8, 4, 4, 3)
labels = np.arange(8, dtype=np.int32)
batch = next(D.iterate_epoch(images, labels, 8, shuffle=False))
out = D.shard_batch(batch)
shards = out["image"].addressable_shards
assert len(shards) == 2 and shards[0].data.shape == (4, 4, 4, 3), [s.data.shape for s in shards]
np.testing.assert_array_equal(np.asarray(shards[1].data), images[4:])
got = list(D.prefetch_to_device(iter([batch, batch]), size=2))
assert len(got) == 2 and got[0]["label"].sharding.is_equivalent_to(D.batch_sharding(), 1)
try:
    D.shard_batch({"x": np.zeros((3, 2))})
except ValueError as e:
    assert "does not split" in str(e)
else:
    raise AssertionError("uneven batch accepted")
print("OK")
"""


def test_shard_batch_over_two_host_devices():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_prefetch_propagates_errors_and_stops():
    def source():
        yield {"x": np.zeros((2,))}
        raise RuntimeError("boom in the source")

    it = D.prefetch_to_device(source(), size=2)
    next(it)
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    endless = D.prefetch_to_device(({"x": np.full((2,), i)} for i in itertools.count()), size=2)
    assert int(np.asarray(next(endless)["x"])[0]) == 0
    endless.close()  # must not hang
