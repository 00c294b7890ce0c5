"""Where the time goes: StridedNet's FLOPs and this machine's attainable XLA FLOP/s.

    python experiments/bench/flops.py                 # FLOPs + XLA conv/matmul timings
    python experiments/bench/flops.py --torch         # also the same convolutions in PyTorch
    python experiments/bench/flops.py --json flops.json

1. Analytic FLOPs per image, layer by layer (a multiply-add = 2 FLOPs; bias, ReLU, BN and
   dropout listed apart as elementwise work), forward; training ~3x (forward + gradient
   w.r.t. the input + gradient w.r.t. the kernel, each the size of the forward).
2. Cross-check with XLA: ``jax.jit(f).lower(...).compile().cost_analysis()["flops"]`` of
   cnnlab's StridedNet forward (inference) and of its loss's ``value_and_grad``, per image.
3. Attainable XLA FLOP/s on this machine: each StridedNet convolution at batch 32 and 128,
   forward alone and forward + both gradients (``jax.vjp``), the two dense layers, and a
   large matmul (2048^3). Median of repeats after a warm-up call.
4. The bound: sum over the layers of (their measured fwd+bwd time) = the time a training step
   would take if nothing but the convolutions and matmuls ran, at XLA's own kernel speed;
   its inverse is an images/s ceiling to compare cnnlab's measured training rate with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
from common import jax_ms  # noqa: E402

NUM_CLASSES = 102

# (name, H_in, W_in, C_in, C_out, kernel, stride, padding) for NHWC inputs
CONVS = [
    ("stem 7x7/2", 96, 96, 3, 16, 7, 2, "VALID"),
    ("b1 3x3", 45, 45, 16, 32, 3, 1, "SAME"),
    ("b1 3x3/2", 45, 45, 32, 32, 3, 2, "SAME"),
    ("b2 3x3", 23, 23, 32, 64, 3, 1, "SAME"),
    ("b2 3x3/2", 23, 23, 64, 64, 3, 2, "SAME"),
    ("b3 3x3", 12, 12, 64, 128, 3, 1, "SAME"),
    ("b3 3x3/2", 12, 12, 128, 128, 3, 2, "SAME"),
]
DENSES = [("dense 4608->512", 4608, 512), ("dense 512->102", 512, NUM_CLASSES)]


def out_size(n: int, k: int, s: int, padding: str) -> int:
    return (n - k) // s + 1 if padding == "VALID" else -(-n // s)


def taps_inside(n: int, k: int, s: int, padding: str) -> int:
    """Sum over the output positions of one axis of the kernel taps that land inside the input
    (not on zero padding); XLA's cost analysis counts only these."""
    out = out_size(n, k, s, padding)
    if padding == "VALID":
        return out * k
    pad_lo = max((out - 1) * s + k - n, 0) // 2
    return sum(sum(0 <= o * s - pad_lo + t < n for t in range(k)) for o in range(out))


def analytic() -> dict:
    """Per-image forward FLOPs, layer by layer."""
    rows = []
    for name, h, w, cin, cout, k, s, pad in CONVS:
        ho, wo = out_size(h, k, s, pad), out_size(w, k, s, pad)
        macs = ho * wo * cout * k * k * cin
        macs_inside = taps_inside(h, k, s, pad) * taps_inside(w, k, s, pad) * cout * cin
        elementwise = ho * wo * cout * (1 if name.startswith("stem") else 1 + 1 + 4)  # bias, relu, BN
        rows.append({"layer": name, "out": [ho, wo, cout], "macs": macs, "flops": 2 * macs,
                     "flops_no_padding": 2 * macs_inside, "elementwise": elementwise})
    for name, fin, fout in DENSES:
        macs = fin * fout
        rows.append({"layer": name, "out": [fout], "macs": macs, "flops": 2 * macs,
                     "flops_no_padding": 2 * macs, "elementwise": fout * (6 if fout == 512 else 1)})
    total = sum(r["flops"] for r in rows)
    elem = sum(r["elementwise"] for r in rows)
    # training: forward + kernel gradient + input gradient (none for the stem: the images)
    train = 3 * total - rows[0]["flops"]
    return {"layers": rows, "forward_flops": total, "forward_elementwise": elem,
            "forward_flops_no_padding": sum(r["flops_no_padding"] for r in rows),
            "train_flops_approx": train}


def xla_cost(batch: int = 32) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from cnnlab import models, nn

    model = models.get_model("stridednet", num_classes=NUM_CLASSES)
    x = jnp.zeros((batch, 96, 96, 3), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(0), x[:1], training=False)

    def forward(v, x):
        return model.apply(v, x, training=False)

    def loss(params, batch_stats, x, y):
        logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, training=True,
                                  rngs={"dropout": jax.random.key(1)},
                                  mutable=["batch_stats", nn.LOSSES])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def flops_of(f, *args):
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"])

    fwd = flops_of(forward, variables, x)
    grad = flops_of(jax.value_and_grad(loss), variables["params"], variables["batch_stats"], x, y)
    return {"batch": batch, "forward_flops_per_image": fwd / batch,
            "value_and_grad_flops_per_image": grad / batch}


def xla_kernels(batch: int, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    rows = []
    for name, h, w, cin, cout, k, s, pad in CONVS:
        x = jax.random.normal(key, (batch, h, w, cin), jnp.float32)
        kern = jax.random.normal(key, (k, k, cin, cout), jnp.float32)
        dn = ("NHWC", "HWIO", "NHWC")

        def conv(x, kern, s=s, pad=pad, dn=dn):
            return jax.lax.conv_general_dilated(x, kern, (s, s), pad, dimension_numbers=dn)

        def dgrad(x, kern, conv=conv):  # gradient w.r.t. the input
            y, vjp = jax.vjp(lambda x: conv(x, kern), x)
            return vjp(y)

        def wgrad(x, kern, conv=conv):  # gradient w.r.t. the kernel
            y, vjp = jax.vjp(lambda kk: conv(x, kk), kern)
            return vjp(y)

        ho, wo = out_size(h, k, s, pad), out_size(w, k, s, pad)
        flops = 2 * batch * ho * wo * cout * k * k * cin
        t_f = jax_ms(jax.jit(conv), x, kern, repeats=repeats) / 1e3
        # each gradient program also recomputes the forward (to form the cotangent y): subtract it
        t_w = max(jax_ms(jax.jit(wgrad), x, kern, repeats=repeats) / 1e3 - t_f, 1e-9)
        stem = name.startswith("stem")  # the network's input needs no gradient
        t_d = 0.0 if stem else max(jax_ms(jax.jit(dgrad), x, kern, repeats=repeats) / 1e3 - t_f, 1e-9)
        t_fb = t_f + t_d + t_w
        n_pass = 2 if stem else 3
        rows.append({"layer": name, "batch": batch, "fwd_s": t_f, "fwd_gflops": flops / t_f / 1e9,
                     "dgrad_s": t_d, "wgrad_s": t_w, "wgrad_gflops": flops / t_w / 1e9,
                     "fwd_bwd_s": t_fb, "fwd_bwd_gflops": n_pass * flops / t_fb / 1e9})
    for name, fin, fout in DENSES:
        x = jax.random.normal(key, (batch, fin), jnp.float32)
        wgt = jax.random.normal(key, (fin, fout), jnp.float32)

        def fwd_bwd(x, wgt):
            y, vjp = jax.vjp(jnp.dot, x, wgt)
            return vjp(y)

        flops = 2 * batch * fin * fout
        t_f = jax_ms(jax.jit(jnp.dot), x, wgt, repeats=repeats) / 1e3
        t_fb = jax_ms(jax.jit(fwd_bwd), x, wgt, repeats=repeats) / 1e3
        rows.append({"layer": name, "batch": batch, "fwd_s": t_f, "fwd_gflops": flops / t_f / 1e9,
                     "dgrad_s": None, "wgrad_s": None, "wgrad_gflops": None,
                     "fwd_bwd_s": t_fb, "fwd_bwd_gflops": 3 * flops / t_fb / 1e9})
    return rows


def torch_kernels(batch: int, repeats: int, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    rows = []

    def timed(f):
        f()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def add_row(name, flops, fwd, fwd_bwd, bwd_factor):
        # bwd_factor: forward + backward FLOPs in units of the forward's (3; 2 without dgrad).
        t_f, t_fb = timed(fwd), timed(fwd_bwd)
        rows.append({"layer": name, "batch": batch, "fwd_s": t_f, "fwd_gflops": flops / t_f / 1e9,
                     "dgrad_s": None, "wgrad_s": None, "wgrad_gflops": None,
                     "fwd_bwd_s": t_fb, "fwd_bwd_gflops": bwd_factor * flops / t_fb / 1e9})

    for name, h, w, cin, cout, k, s, pad in CONVS:
        x = torch.randn(batch, cin, h, w, requires_grad=True)
        conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=(0 if pad == "VALID" else k // 2), bias=False)
        ho, wo = out_size(h, k, s, pad), out_size(w, k, s, pad)
        flops = 2 * batch * ho * wo * cout * k * k * cin

        def fwd(conv=conv, x=x):
            with torch.no_grad():
                return conv(x)

        stem = name.startswith("stem")
        x.requires_grad_(not stem)

        def fwd_bwd(conv=conv, x=x):
            y = conv(x)
            y.backward(y.detach())

        add_row(name, flops, fwd, fwd_bwd, 2 if stem else 3)
    for name, fin, fout in DENSES:
        x = torch.randn(batch, fin, requires_grad=True)
        lin = torch.nn.Linear(fin, fout, bias=False)
        flops = 2 * batch * fin * fout

        def fwd(lin=lin, x=x):
            with torch.no_grad():
                return lin(x)

        def fwd_bwd(lin=lin, x=x):
            y = lin(x)
            y.backward(y.detach())

        add_row(name, flops, fwd, fwd_bwd, 3)
    return rows


def matmul(n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    t = jax_ms(jax.jit(jnp.dot), a, a, repeats=repeats) / 1e3
    return {"n": n, "s": t, "gflops": 2 * n**3 / t / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="32,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch", action="store_true", help="also time the layers in PyTorch (fwd+bwd "
                   "only: its gradients come from one backward call)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    out: dict = {"loadavg_start": list(os.getloadavg()), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    a = analytic()
    out["analytic"] = a
    print("## Analytic FLOPs per image (forward; multiply-add = 2 FLOPs)\n")
    print("| layer | output | MFLOPs | share | MFLOPs without the zero-padding taps |\n|---|---|---|---|---|")
    for r in a["layers"]:
        print(f"| {r['layer']} | {'x'.join(map(str, r['out']))} | {r['flops'] / 1e6:.2f} | "
              f"{r['flops'] / a['forward_flops']:.1%} | {r['flops_no_padding'] / 1e6:.2f} |")
    print(f"| **total** | | **{a['forward_flops'] / 1e6:.1f}** | | {a['forward_flops_no_padding'] / 1e6:.1f} |")
    print(f"\nelementwise (bias, ReLU, BN affine+stats) ~{a['forward_elementwise'] / 1e6:.2f} M ops; "
          f"training (forward + both gradients, no input gradient for the stem) = "
          f"{a['train_flops_approx'] / 1e6:.0f} MFLOPs/image ({a['train_flops_approx'] / a['forward_flops']:.2f}x)\n")

    cost = xla_cost()
    out["xla_cost_analysis"] = cost
    print(f"XLA cost_analysis (cnnlab StridedNet, batch {cost['batch']}): forward "
          f"{cost['forward_flops_per_image'] / 1e6:.1f} MFLOPs/image, value_and_grad "
          f"{cost['value_and_grad_flops_per_image'] / 1e6:.1f} MFLOPs/image "
          f"({cost['value_and_grad_flops_per_image'] / cost['forward_flops_per_image']:.2f}x)\n")

    mm = matmul(2048, args.repeats)
    out["matmul"] = mm
    print(f"XLA matmul 2048^3 f32: {mm['s'] * 1e3:.1f} ms = {mm['gflops']:.1f} GFLOP/s\n")

    out["kernels"] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        systems = [("xla", xla_kernels(batch, args.repeats))]
        if args.torch:
            systems.append(("torch", torch_kernels(batch, args.repeats, args.threads)))
        for system, rows in systems:
            out["kernels"][f"{system}@{batch}"] = rows
            print(f"### {system}, batch {batch}\n")
            print("| layer | fwd ms | fwd GFLOP/s | input-grad ms | kernel-grad ms | kernel-grad "
                  "GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s |\n|---|---|---|---|---|---|---|---|")
            for r in rows:
                ms = lambda v: "" if v is None else f"{v * 1e3:.2f}"  # noqa: E731
                gf = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
                print(f"| {r['layer']} | {ms(r['fwd_s'])} | {gf(r['fwd_gflops'])} | {ms(r['dgrad_s'])} | "
                      f"{ms(r['wgrad_s'])} | {gf(r['wgrad_gflops'])} | {ms(r['fwd_bwd_s'])} | "
                      f"{gf(r['fwd_bwd_gflops'])} |")
            t_step = sum(r["fwd_bwd_s"] for r in rows)
            t_fwd = sum(r["fwd_s"] for r in rows)
            train_flops = batch * a["train_flops_approx"]
            print(f"| **sum** | {t_fwd * 1e3:.1f} | {batch * a['forward_flops'] / t_fwd / 1e9:.1f} | | | | "
                  f"{t_step * 1e3:.1f} | {train_flops / t_step / 1e9:.1f} |")
            bound = {"train_step_s": t_step, "train_img_s_bound": batch / t_step,
                     "eval_img_s_bound": batch / t_fwd,
                     "matmul_img_s_bound": mm["gflops"] * 1e9 / a["train_flops_approx"]}
            out["kernels"][f"{system}@{batch}:bound"] = bound
            print(f"\nconv+dense kernels alone: training <= {bound['train_img_s_bound']:.0f} img/s, "
                  f"inference <= {bound['eval_img_s_bound']:.0f} img/s (at the matmul's "
                  f"{mm['gflops']:.0f} GFLOP/s: training <= {bound['matmul_img_s_bound']:.0f} img/s)\n")
    out["loadavg_end"] = list(os.getloadavg())
    print(f"load average: start {out['loadavg_start'][0]:.2f}, end {out['loadavg_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
