"""Interleaved A/B of cnnlab checkouts (or environments) on ``bench_cnnlab.py``.

    git worktree add /tmp/before HEAD~1
    python experiments/bench/ab.py --tree before=/tmp/before --tree after=. --rounds 3 --batches 32

Each round runs every variant once per batch, each in its own process, and the medians of the
training and evaluation rates are printed at the end. ``--tree NAME=PATH`` runs PATH's own
``experiments/bench/bench_cnnlab.py`` (which imports cnnlab from PATH); ``--env NAME=K=V``
adds an environment variable to that variant (e.g. an ``XLA_FLAGS`` attempt); ``--args
NAME=ARGS`` adds arguments to that variant's calls (e.g. ``--args bf16='--set
mixed_precision=True'``; one tree may be named twice). Arguments after ``--`` go to every
``bench_cnnlab.py`` call. ``--script bench_flax.py -- --model cnnlab``
times cnnlab's layers in the plain jitted step instead of the trainer. Nothing else should run
meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a cnnlab checkout")
    p.add_argument("--env", action="append", default=[], help="NAME=KEY=VALUE for variant NAME")
    p.add_argument("--args", action="append", default=[], help="NAME=ARGS: extra arguments for variant NAME")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="32")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--script", default="bench_cnnlab.py",
                   help="which of each tree's experiments/bench scripts to time")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then arguments for bench_cnnlab.py")
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    envs: dict[str, dict[str, str]] = {name: {} for name in trees}
    variant_args: dict[str, list[str]] = {name: [] for name in trees}

    def variant(item: str, flag: str) -> tuple[str, str]:
        name, _, rest = item.partition("=")
        if name not in trees:
            p.error(f"{flag} {item!r}: no --tree named {name!r} (trees: {', '.join(trees)})")
        return name, rest

    for item in args.env:
        name, key_value = variant(item, "--env")
        key, value = key_value.split("=", 1)
        envs[name][key] = value
    for item in args.args:
        name, value = variant(item, "--args")
        variant_args[name].extend(shlex.split(value))
    extra = [a for a in args.rest if a != "--"]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for batch in (int(b) for b in args.batches.split(",")):
            for name, tree in trees.items():
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                env.update(envs[name])
                script = os.path.join(os.path.abspath(tree), "experiments", "bench", args.script)
                cmd = [sys.executable, script, "--batch", str(batch), "--steps", str(args.steps), *extra,
                       *variant_args[name]]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
                if line is None:
                    print(f"round {r} {name} b{batch}: failed\n{out.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(line[len("BENCH_RESULT "):])
                results.setdefault((name, batch), []).append((res["train_img_s"], res["eval_img_s"]))
                print(f"round {r} {name:>12} b{batch}: train {res['train_img_s']:.1f} img/s, "
                      f"eval {res['eval_img_s']:.0f} img/s", flush=True)
    print()
    for (name, batch), runs in results.items():
        train = [t for t, _ in runs]
        print(f"{name:>12} b{batch}: train median {statistics.median(train):.1f} img/s "
              f"(rounds {', '.join(f'{t:.0f}' for t in train)}), eval median "
              f"{statistics.median(e for _, e in runs):.0f} img/s")


if __name__ == "__main__":
    main()
