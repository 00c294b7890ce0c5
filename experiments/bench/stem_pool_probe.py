"""The caltech101 ResNet's stem pool inside its neighbours, forward + backward: ReLU, max pooling
3x3/2 'same' on [32, 48, 48, 32], then a batch-norm-like centring and scaling in float32, and the
gradient with respect to the ReLU's input. Milliseconds per call, median of 5 rounds of 20.

    python experiments/bench/stem_pool_probe.py --dtype bfloat16
    python experiments/bench/stem_pool_probe.py --dtype float32
    python experiments/bench/stem_pool_probe.py --dtype round   # float32 in and out, the ReLU's
                                                                # output rounded to bfloat16
    XLA_FLAGS=--xla_dump_to=/tmp/dump python experiments/bench/stem_pool_probe.py ...

With ``--xla_dump_to``, the backward loop's optimized LLVM IR is the largest ``*ir-with-opt.ll``
file; ``grep -c '<8 x float>'`` counts its vector operations.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "round"), default="bfloat16")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import cnnlab.functional as F

    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    x = jnp.asarray(rng.standard_normal((32, 48, 48, 32)), dtype)
    scale = jnp.asarray(rng.standard_normal((32,)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((32, 24, 24, 32)), jnp.float32)

    def loss(x, scale):
        h = jax.nn.relu(x.astype(jnp.bfloat16) if args.dtype == "round" else x)
        pooled = F.max_pool(h, 3, 2, padding="same").astype(jnp.float32)
        return jnp.vdot((pooled - jnp.mean(pooled, axis=(0, 1, 2))) * scale, cot)

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(x, scale))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            out = grad(x, scale)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / 20 * 1e3)
    print(f"stem pool probe, {args.dtype}: {statistics.median(times):.2f} ms per forward + backward")


if __name__ == "__main__":
    main()
