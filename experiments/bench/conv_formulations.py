"""Each StridedNet convolution's three parts (forward, input gradient, kernel gradient) timed
alone, XLA's own formulation against the alternatives in ``cnnlab.native.conv_impl``.

    python experiments/bench/conv_formulations.py                    # batch 32 and 128
    python experiments/bench/conv_formulations.py --batches 32 --repeats 7 --json out.json

Per layer and batch: median ms of each part under each formulation (after a compiling call),
and GFLOP/s (a multiply-add = 2 FLOPs; the kernel and input gradients cost what the forward
does). XLA's kernel gradient is what ``jax.vjp`` of ``lax.conv_general_dilated`` emits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cnnlab.runtime  # noqa: E402

cnnlab.runtime.configure()  # the cnnlab commands' XLA:CPU flags, before JAX starts
from cnnlab.native import conv_impl  # noqa: E402

sys.path.insert(0, HERE)
from common import jax_ms  # noqa: E402
from flops import CONVS  # noqa: E402  (StridedNet's convolutions: name, H, W, C_in, C_out, k, s, padding)


def measure(layer, batch: int, repeats: int) -> dict:
    name, h, w, cin, cout, k, s, padding = layer
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin), np.float32))
    kern = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.1)
    spec = conv_impl.ConvSpec.make(x.shape, kern.shape, strides=(s, s), padding=padding,
                                   dilation=(1, 1))
    y = conv_impl.xla_forward(x, kern, spec)
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    flops = 2 * y.size * k * k * cin
    row = {"layer": name, "batch": batch, "mflop": flops / 1e6}
    args = {"fwd": (x, kern), "dx": (g, kern), "dw": (x, g)}
    # Only the formulations that apply to this layer here (a missing oneDNN: XLA's under its name).
    parts = {part: {f: (conv_impl.TABLES[part][f], *args[part]) for f in names}
             for part, names in conv_impl.applicable(spec).items()}
    for part, forms in parts.items():
        for form, (fn, a, b) in forms.items():
            jitted = jax.jit(lambda a, b, fn=fn: fn(a, b, spec))
            ms = jax_ms(jitted, a, b, repeats=repeats)
            row[f"{part}/{form}"] = round(ms, 3)
            row[f"{part}/{form}/gflops"] = round(flops / ms / 1e6, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="32,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = []
    for batch in map(int, args.batches.split(",")):
        for layer in CONVS:
            row = measure(layer, batch, args.repeats)
            rows.append(row)
            cells = "  ".join(f"{k}={v}" for k, v in row.items() if k.count("/") == 1)
            print(f"{row['layer']:<10} b{batch:<4} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
