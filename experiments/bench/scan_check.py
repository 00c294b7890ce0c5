"""Why ``steps_per_dispatch > 1`` is slow on XLA CPU: one StridedNet-shaped convolution's
forward + gradients, run k times from Python, inside ``lax.scan`` and inside an unrolled scan.

    python experiments/bench/scan_check.py [--batch 32] [--k 4]

cnnlab's trainer runs ``steps_per_dispatch`` steps as ``jax.lax.scan(step_fn, state, batches)``;
on this jaxlib the convolutions inside a while loop body are much slower than the same
convolutions at the top level of a program. This isolates that with one convolution layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.k, args.batch, 45, 45, 16))
    w = jax.random.normal(key, (3, 3, 16, 32)) * 0.1

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.relu(y) ** 2)

    def step(w, x):
        g = jax.grad(loss)(w, x)
        return w - 1e-3 * g, None

    one = jax.jit(step)

    def python_loop(w, xs):
        for i in range(args.k):
            w, _ = one(w, xs[i])
        return w

    variants = {
        "python loop of jitted steps": python_loop,
        "lax.scan (unroll=1)": jax.jit(lambda w, xs: jax.lax.scan(step, w, xs)[0]),
        f"lax.scan (unroll={args.k})": jax.jit(lambda w, xs: jax.lax.scan(step, w, xs, unroll=args.k)[0]),
        "fori_loop": jax.jit(lambda w, xs: jax.lax.fori_loop(0, args.k, lambda i, w: step(w, xs[i])[0], w)),
    }
    print(f"conv 3x3 16->32 at 45x45, batch {args.batch}, forward + kernel gradient, {args.k} steps\n")
    print("| how | ms per step |\n|---|---|")
    for name, fn in variants.items():
        jax.block_until_ready(fn(w, x))
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(w, x))
            ts.append(time.perf_counter() - t)
        print(f"| {name} | {statistics.median(ts) / args.k * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
