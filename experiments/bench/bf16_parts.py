"""Where a bfloat16 ResNet step's time goes, part by part, outside the step.

    python experiments/bench/bf16_parts.py convs          # cnnlab's convolutions, bfloat16
    python experiments/bench/bf16_parts.py convs --torch  # PyTorch's (channels_last, 2 threads)
    python experiments/bench/bf16_parts.py block          # batch norm + residual add + ReLU

``convs``: each 3x3 convolution shape of the caltech101 ResNet at 96 px (batch 32), forward
alone and forward + both gradients, in bfloat16: cnnlab's ``conv2d`` under one ``jax.jit``
(oneDNN where the formulation cache chose it), or ``torch.nn.Conv2d``. ``block``: cnnlab's
training batch norm, a residual add and a ReLU at [32, 24, 24, 64], forward and forward +
backward, float32 against bfloat16. Milliseconds per call, median of 5 (7) repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = [(32, 64, 24, 1), (64, 64, 24, 1), (64, 128, 24, 2), (128, 128, 12, 1), (256, 256, 6, 1)]
BATCH = 32


def _ms(fn, reps: int = 5, calls: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def torch_convs() -> None:
    import torch
    torch.set_num_threads(2)
    for cin, cout, hw, stride in SHAPES:
        _torch_conv(torch, cin, cout, hw, stride)


def _torch_conv(torch, cin: int, cout: int, hw: int, stride: int) -> None:
    x = torch.randn(BATCH, cin, hw, hw).to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    x.requires_grad_()
    conv = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    conv = conv.to(memory_format=torch.channels_last, dtype=torch.bfloat16)

    def both():
        y = conv(x)
        y.backward(torch.ones_like(y))

    def forward():
        with torch.no_grad():
            conv(x)

    print(f"torch  {cin}->{cout} at {hw}x{hw}, stride {stride}: forward {_ms(forward):.2f} ms, "
          f"forward + gradients {_ms(both):.2f} ms")


def cnnlab_convs() -> None:
    import cnnlab.runtime
    cnnlab.runtime.configure()
    rng = np.random.default_rng(0)
    for cin, cout, hw, stride in SHAPES:
        _cnnlab_conv(rng, cin, cout, hw, stride)


def _cnnlab_conv(rng, cin: int, cout: int, hw: int, stride: int) -> None:
    import jax
    import jax.numpy as jnp

    import cnnlab.functional as F
    x = jnp.asarray(rng.standard_normal((BATCH, hw, hw, cin)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.bfloat16)

    def conv(x, w):
        return F.conv2d(x, w, strides=stride, padding="same")

    forward = jax.jit(conv)
    both = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32)), argnums=(0, 1)))
    print(f"cnnlab {cin}->{cout} at {hw}x{hw}, stride {stride}: "
          f"forward {_ms(lambda: jax.block_until_ready(forward(x, w))):.2f} ms, "
          f"forward + gradients {_ms(lambda: jax.block_until_ready(both(x, w))):.2f} ms")


def block() -> None:
    import cnnlab.runtime
    cnnlab.runtime.configure()
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        _block(rng, dtype)


def _block(rng, dtype) -> None:
    import jax
    import jax.numpy as jnp

    import cnnlab.functional as F
    shape = (BATCH, 24, 24, 64)
    x, residual, cot = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    gamma, beta = jnp.ones((64,), jnp.float32), jnp.zeros((64,), jnp.float32)

    def fwd(x, residual, gamma, beta):
        y = F.batch_norm_training(x, gamma=gamma.astype(x.dtype), beta=beta.astype(x.dtype))[0]
        return jax.nn.relu(y + residual)

    def loss(*args):
        return jnp.vdot(fwd(*args).astype(jnp.float32), cot.astype(jnp.float32))

    args = (x, residual, gamma, beta)
    forward, both = jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    print(f"{jnp.dtype(dtype).name:8s} batch norm + add + ReLU at {shape}: "
          f"forward {_ms(lambda: jax.block_until_ready(forward(*args)), 7, 20):.2f} ms, "
          f"forward + backward {_ms(lambda: jax.block_until_ready(both(*args)), 7, 20):.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("convs", "block"))
    p.add_argument("--torch", action="store_true", help="PyTorch's convolutions instead of cnnlab's")
    args = p.parse_args()
    if args.part == "block":
        block()
    elif args.torch:
        torch_convs()
    else:
        cnnlab_convs()


if __name__ == "__main__":
    main()
