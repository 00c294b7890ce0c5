"""cnnlab's CPU max pooling (strided slices, custom JVP) against XLA's reduce-window and
select-and-scatter: the caltech101 ResNet's stem pool (3x3, stride 2, 'same', on post-ReLU
[32, 48, 48, 32] float32), forward alone and forward + backward, interleaved rounds in one
process; checks that values and gradients are bitwise equal first.

    python experiments/bench/maxpool_check.py
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 python experiments/bench/maxpool_check.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="32,48,48,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import cnnlab.functional as F

    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0), jnp.float32)  # post-ReLU: tied zeros

    def xla(v):
        return lax.reduce_window(v, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

    def ours(v):
        return F.max_pool(v, 3, 2, padding="same")

    cot = jnp.asarray(rng.standard_normal(ours(x).shape), jnp.float32)
    fns = {}
    for name, f in (("reduce-window", xla), ("slices", ours)):
        fns[f"{name} forward"] = jax.jit(f)
        fns[f"{name} forward+backward"] = jax.jit(jax.grad(lambda v, f=f: jnp.vdot(f(v), cot)))
    assert bool(jnp.all(fns["slices forward"](x) == fns["reduce-window forward"](x)))
    assert bool(jnp.all(fns["slices forward+backward"](x) == fns["reduce-window forward+backward"](x)))
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            jax.block_until_ready(f(x))
            start = time.perf_counter()
            for _ in range(args.calls):
                out = f(x)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"max pooling 3x3/2 same on {shape}, values and gradients bitwise equal; ms per call, "
          f"median of {args.rounds} interleaved rounds (min-max):")
    for k, v in times.items():
        print(f"  {k:28s} {statistics.median(v):7.2f}  ({min(v):.2f}-{max(v):.2f})")


if __name__ == "__main__":
    main()
