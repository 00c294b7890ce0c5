"""Where PyTorch eager's training step spends its time: the peer's side of ``profile_step.py``.

    python experiments/bench/profile_torch.py --model resnet --batch 32 --steps 30
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python experiments/bench/profile_torch.py ...
    python experiments/bench/profile_torch.py --bf16 ...   # bfloat16 autocast, as bench_torch.py --bf16

Builds ``bench_torch.py``'s model (channels_last, 2 threads, its optimizer and loss), runs
``--warmup`` steps, then ``--steps`` steps under ``torch.profiler`` and prints milliseconds per
step of each ATen operator's own CPU time (``self_cpu_time_total``: children excluded, so the
rows add up to the step), grouped into the kinds ``profile_step.py`` reports: convolutions
forward and backward, batch norm, pointwise ops, pooling, the optimizer.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

KINDS = (  # (substring of the ATen op name, kind); the first match wins
    ("convolution_backward", "conv backward"),
    ("mkldnn_convolution", "conv forward"),
    ("convolution", "conv forward"),
    ("batch_norm_backward", "batch norm backward"),
    ("batch_norm", "batch norm forward"),
    ("max_pool", "max pool"),
    ("threshold_backward", "relu backward"),
    ("relu", "relu forward"),
    ("_foreach", "optimizer"),
    ("sgd", "optimizer"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("stridednet", "resnet"), default="resnet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the forward pass")
    args = p.parse_args()
    import bench_torch
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

    build = bench_torch.resnet if args.model == "resnet" else bench_torch.stridednet
    model, regularized, opt, loss_fn, weight_decay = build(torch, nn, bn)
    model = model.to(memory_format=torch.channels_last).train()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.batch, 3, args.image_size, args.image_size), dtype=np.float32))
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(rng.integers(0, common.NUM_CLASSES, args.batch)).long()

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def step():
        with autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y) + weight_decay * sum((k * k).sum() for k in regularized)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step().item()
    wall_ms = 1e3 * (time.perf_counter() - t) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step().item()
    by_kind: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / args.steps
        kind = next((k for s, k in KINDS if s in e.key), "other")
        by_kind[kind] += ms
        by_op[e.key] += ms
    total = sum(by_kind.values())
    print(f"torch {torch.__version__}, {args.model}{' bf16' if args.bf16 else ''}, batch {args.batch}: {wall_ms:.1f} ms per step unprofiled "
          f"({1e3 * args.batch / wall_ms:.0f} img/s), {total:.1f} ms of operators' own CPU time profiled\n")
    print("| ms/step | share | kind |\n|---|---|---|")
    for kind, ms in by_kind.most_common():
        print(f"| {ms:.2f} | {100 * ms / total:.1f}% | {kind} |")
    print("\nlargest operators:")
    for op, ms in by_op.most_common(20):
        print(f"  {ms:7.2f} ms/step  {op}")


if __name__ == "__main__":
    main()
