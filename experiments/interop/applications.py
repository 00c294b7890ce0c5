"""Every ``keras.applications`` CNN the issue names, imported with ``cnnlab.interop.from_keras``:
whether it imports, how long the import takes, and how far its outputs are from Keras'.

    python experiments/interop/applications.py [--only VGG16,ResNet50] [--out results.json]

Each application runs in its own process (``weights=None``, 10 classes, moving statistics
randomized, dropout rates set to 0 so that training mode is comparable; a batch of 4 uniform
0..255 images at the input size of ``tests/test_keras_graph.py``) and reports: Keras' build
time, ``from_keras``'s time, parameters (``count_params``), and the largest relative difference
(``interop.compare_with_keras``) in inference and in training mode. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

_ONE = r"""
import json, os, sys, time
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("CNNLAB_CONV_FORMULATION", "xla")  # Keras' own convolutions: XLA's
sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
import numpy as np, keras
from test_keras_graph import _no_dropout, _randomize_stats
from cnnlab import interop
name, size = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10)
build_s = time.perf_counter() - t
_randomize_stats(model)
_no_dropout(model)
out = {"name": name, "size": size, "build_s": build_s, "params": int(model.count_params())}
try:
    t = time.perf_counter()
    module, variables = interop.from_keras(model)
    out["import_s"] = time.perf_counter() - t
except interop.InteropError as err:
    out["error"] = str(err)
else:
    x = np.random.default_rng(1).uniform(0.0, 255.0, (4, size, size, 3)).astype("float32")
    t = time.perf_counter()
    out.update(interop.compare_with_keras(model, module, variables, x))
    out["compare_s"] = time.perf_counter() - t
print("RESULT " + json.dumps(out))
"""


def applications() -> list[tuple[str, int]]:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from test_keras_graph import APPLICATIONS

    return list(APPLICATIONS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated application names")
    p.add_argument("--timeout", type=int, default=900, help="seconds per application")
    p.add_argument("--out", default=os.path.join(HERE, "results_applications.json"))
    args = p.parse_args()
    only = {n for n in args.only.split(",") if n}
    rows = []
    for name, size in applications():
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", _ONE, name, str(size), REPO], capture_output=True,
                                  text=True, timeout=args.timeout, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = (json.loads(lines[-1][7:]) if lines else
                   {"name": name, "size": size, "error": proc.stderr.strip().splitlines()[-1:]})
        except subprocess.TimeoutExpired:
            row = {"name": name, "size": size, "error": f"timeout after {args.timeout} s"}
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print()
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| application | input | imports | max rel. diff. inference | training | from_keras s | "
             "parameters |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "error" not in r
        lines.append(
            f"| {r['name']} | {r['size']}x{r['size']} | {'yes' if ok else 'no: ' + str(r['error'])[:80]} | "
            + (f"{r['inference']:.1e} | {r['training']:.1e} | {r['import_s']:.1f} | " if ok else "| | | ")
            + f"{r.get('params', 0):,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
