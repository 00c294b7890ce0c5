"""Benchmark of the cnnlab.data pipeline on the CALTECH-101 folder tree.

Measures, at one image size (default 96x96):
  1. cold preparation (fresh, empty cache dir): decode + resize + cache write, images/s,
     with all cores and (optionally) with one thread for comparison;
  2. warm load (cache hit, checksum verified, splits built);
  3. host epoch iterator throughput (shuffled, batch 32 and 128);
  4. on-device augmentation throughput (the tutorial preset, batch 32 and 128, after the jit
     warm-up), plus normalize; and the prefetch-to-device loop.

Usage (from the project root):
  CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \
      python experiments/data_pipeline/bench.py [--image-size 96] [--serial] [--json out.json]
  python experiments/data_pipeline/bench.py --synthetic   # no dataset needed (device figures)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time


def _timeit(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", default=os.environ.get("CALTECH101_DIR"))
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--classes", default="all")
    ap.add_argument(
        "--serial", action="store_true", help="also time a single-thread cold preparation"
    )
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="skip preparation; synthetic data for device figures",
    )
    ap.add_argument(
        "--repeat", type=int, default=2, help="cold preparations per setting (fresh cache each)"
    )
    ap.add_argument(
        "--aug-steps", type=int, default=50, help="timed calls per measurement (best of 3)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import cnnlab.data as D

    res: dict = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "device_count": jax.device_count(),
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "image_size": args.image_size,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    base = {"classes": args.classes, "image_size": args.image_size, "split": "tfds"}
    if args.synthetic:
        ds = D.load_dataset(
            {
                "source": "synthetic",
                "synthetic_num_classes": 10,
                "synthetic_per_class": 300,
                "classes": "all",
                "image_size": args.image_size,
                "split": "tfds",
            },
            verbose=False,
        )
    else:
        if not args.data_dir:
            sys.exit("set --data-dir or CALTECH101_DIR (or use --synthetic)")
        base["data_dir"] = args.data_dir
        runs = [("all_cores", -1)] + ([("one_thread", 0)] if args.serial else [])
        for rep in range(args.repeat):
            for name, workers in runs:
                cache = tempfile.mkdtemp(prefix="cnnlab-bench-")
                try:
                    cfg = dict(base, cache_dir=cache, num_workers=workers)
                    t0 = time.perf_counter()
                    ds = D.load_dataset(cfg, verbose=False)
                    cold = time.perf_counter() - t0
                    n = len(ds.train) + len(ds.test)
                    res.setdefault(f"prepare_cold_{name}_s", []).append(round(cold, 2))
                    res.setdefault(f"decode_{name}_s", []).append(
                        ds.manifest.get("prepare_seconds")
                    )
                    res["num_images"] = n
                    if name == "all_cores" and rep == 0:
                        warm = _timeit(lambda cfg=cfg: D.load_dataset(cfg, verbose=False))
                        res["load_warm_s"] = round(warm, 3)
                        res["cache_bytes"] = sum(f.stat().st_size for f in ds.cache_path.iterdir())
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
        for name, _ in runs:
            best = min(res[f"prepare_cold_{name}_s"])
            res[f"prepare_cold_{name}_img_per_s_best"] = round(res["num_images"] / best, 1)
        print(
            f"prepared {res['num_images']} images: cold {res['prepare_cold_all_cores_s']} s, warm {res['load_warm_s']} s",
            flush=True,
        )

    images, labels = ds.train.images, ds.train.labels
    if len(labels) < 2048:  # iterate over everything for a longer epoch
        images = np.concatenate([ds.train.images, ds.test.images])
        labels = np.concatenate([ds.train.labels, ds.test.labels])
    for bs in (32, 128):

        def epoch(bs=bs):
            for _ in D.iterate_epoch(images, labels, bs, seed=0, epoch=1):
                pass

        t = _timeit(epoch)
        res[f"iterator_b{bs}_img_per_s"] = round((len(labels) // bs) * bs / t)

    key = jax.random.PRNGKey(0)
    pipeline = D.augment_pipeline(D.augment_preset("tutorial"), 2)
    aug = jax.jit(lambda k, v: pipeline(k, v, jnp.zeros(v.shape[0], jnp.int32))[0])
    norm = jax.jit(lambda v: D.normalize(v))
    for bs in (32, 128):
        x = jax.device_put(images[:bs])
        keys = jax.random.split(key, args.aug_steps)
        jax.block_until_ready(aug(key, x))  # compile
        jax.block_until_ready(norm(x))

        def run_aug(x=x, keys=keys):
            out = None
            for k in keys:
                out = aug(k, x)
            jax.block_until_ready(out)

        def run_norm(x=x):
            out = None
            for _ in range(args.aug_steps):
                out = norm(x)
            jax.block_until_ready(out)

        res[f"augment_b{bs}_img_per_s"] = round(bs * args.aug_steps / _timeit(run_aug))
        res[f"normalize_b{bs}_img_per_s"] = round(bs * args.aug_steps / _timeit(run_norm))

    # Host iterator -> prefetch to device -> augment + normalize (a training input loop without a model).
    step = jax.jit(lambda k, b: jnp.mean(D.normalize(aug(k, b["image"]))))
    bs = 128
    it = D.prefetch_to_device(D.iterate_epoch(images, labels, bs, seed=0, epoch=2), size=2)
    first = next(it)
    jax.block_until_ready(step(key, first))
    t0 = time.perf_counter()
    n = 0
    for b in it:
        r = step(key, b)
        n += bs
    jax.block_until_ready(r)
    res["input_loop_b128_img_per_s"] = round(n / (time.perf_counter() - t0))

    for k, v in res.items():
        print(f"{k:36s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
