"""Shared pieces of the framework benchmark: the data, the protocol and the JSON result line.

Imports only numpy and the standard library, so every system's module (JAX, PyTorch,
TensorFlow, each in its own process and possibly its own virtualenv) can use it.

Protocol (identical for every system):

* data: ``make_data`` draws uint8 images [N, 96, 96, 3] and int labels in [0, 102) from
  ``numpy.random.default_rng(seed)``; the first ``(warmup + steps) * batch`` images are the
  training set, the next ``eval_images`` the evaluation set. No augmentation; the model sees
  ``image / 255`` (computed inside each system's step from the uint8 batch).
* training: ``warmup`` steps (the first includes compilation), then ``steps`` timed steps in
  windows of ``window`` steps; a window ends with a host sync on that step's loss. The train
  rate is the median of the windows' images/s.
* evaluation: one warm-up pass over the evaluation set (compiles), then ``eval_repeats`` timed
  passes; loss + accuracy per batch like ``model.evaluate``. The rate is the median.
* time to first step: from the start of model construction (after the framework imports) to
  the end of the first training step, compilation included; ``import_s`` is reported apart.
* peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (the process's peak
  resident set: framework, compiled code, the data arrays and the training state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

T_START = time.perf_counter()

IMAGE_SIZE = 96
NUM_CLASSES = 102
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 5e-4  # L2 on conv kernels, as in the tutorial
RESULT_PREFIX = "BENCH_RESULT "


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="timed training steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (the first compiles)")
    p.add_argument("--window", type=int, default=5, help="steps per timing window")
    p.add_argument("--eval-images", type=int, default=1024)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p


def check_args(args) -> None:
    if args.warmup < 1 or args.warmup % args.window or args.steps % args.window:
        raise SystemExit("--warmup and --steps must be positive multiples of --window")


def make_data(args):
    """(train_images, train_labels, eval_images, eval_labels), the same for every system."""
    import numpy as np

    n_train = (args.warmup + args.steps) * args.batch
    n = n_train + args.eval_images
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def window_rates(done_at: dict[int, float], batch: int, window: int, warmup: int,
                 steps: int) -> list[float]:
    """images/s of each timed window. ``done_at[s]`` is the time step ``s`` (1-based) had
    completed (a host sync on its result); windows are steps (warmup + j*window, warmup +
    (j+1)*window]."""
    rates = []
    for lo in range(warmup, warmup + steps, window):
        hi = lo + window
        rates.append(window * batch / (done_at[hi] - done_at[lo]))
    return rates


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_ms_per_image(cpu_at: dict[int, float], batch: int, warmup: int, steps: int) -> float:
    """CPU milliseconds (all threads) per timed training image: less sensitive than images/s
    to other processes on the machine, but it counts spin-waiting threads as work."""
    return 1e3 * (cpu_at[warmup + steps] - cpu_at[warmup]) / (steps * batch)


def jax_ms(fn, *args, repeats: int = 5, reduce=statistics.median) -> float:
    """``reduce`` (median, or min for the best) of ``repeats`` timed calls of a JAX function,
    in ms, after one untimed call that compiles it."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return reduce(times) * 1e3


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def report(system: str, args, *, import_s: float, first_step_s: float, train_rates: list[float],
           eval_rates: list[float], eval_first_s: float, train_cpu_ms_per_img: float | None = None,
           extra: dict | None = None) -> dict:
    """Prints the one JSON result line (prefixed, so run.py finds it among log output)."""
    result = {
        "system": system,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "window": args.window,
        "threads": args.threads,
        "train_img_s": statistics.median(train_rates) if train_rates else None,
        "train_img_s_windows": [round(r, 2) for r in train_rates],
        "train_cpu_ms_per_img": train_cpu_ms_per_img,
        "eval_img_s": statistics.median(eval_rates) if eval_rates else None,
        "eval_img_s_passes": [round(r, 2) for r in eval_rates],
        "eval_first_pass_s": eval_first_s,
        "import_s": import_s,
        "first_step_s": first_step_s,
        "peak_rss_mb": peak_rss_mb(),
        "loadavg_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - T_START,
        "python": sys.version.split()[0],
    }
    if extra:
        result.update(extra)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return result
