"""Ratio tables of portable.sh's results: each cnnlab variant against the PyTorch eager run of
the same CPU setting (``cnnlab-avx2`` against ``torch-eager-avx2``...), training and
evaluation, with the medians and the rounds; and ``cnnlab`` (the trainer) against
``cnnlab-step`` (the plain jitted step of the same layers).

    python experiments/bench/ratios.py experiments/bench/results_portable_stridednet.json ...
"""

from __future__ import annotations

import json
import sys


def _peer(name: str) -> str | None:
    """The PyTorch run a cnnlab variant is compared with."""
    if not name.startswith("cnnlab"):
        return None
    suffix = name.rsplit("-", 1)[-1]
    return "torch-eager" + (f"-{suffix}" if suffix in ("avx2", "bf16") else "")


def _fmt(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def tables(path: str) -> str:
    with open(path) as f:
        results = json.load(f)
    summary = results["summary"]
    lines = [f"{path} ({results['meta']['cpu_model']}, {results['meta']['options']['repeats']} rounds)", "",
             "| cnnlab run | vs | batch | train img/s (rounds) | vs img/s (rounds) | train ratio | "
             "eval img/s | vs eval img/s | eval ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        name, batch = s["name"], s["batch"]
        peers = [_peer(name)]
        if name in ("cnnlab", "cnnlab-avx2"):  # the trainer against the plain step
            peers.append("cnnlab-step" + name[len("cnnlab"):])
        for peer in peers:
            o = summary.get(f"{peer}@{batch}")
            if peer is None or o is None or not s["ok"] or not o["ok"]:
                continue
            tr = s["train_img_s"] / o["train_img_s"]
            ev = s["eval_img_s"] / o["eval_img_s"] if s["eval_img_s"] and o["eval_img_s"] else None
            lines.append(
                f"| {name} | {peer} | {batch} | {_fmt(s['train_img_s'])} "
                f"({', '.join(_fmt(x) for x in s['train_img_s_runs'])}) | {_fmt(o['train_img_s'])} "
                f"({', '.join(_fmt(x) for x in o['train_img_s_runs'])}) | **{tr:.2f}x** | "
                f"{_fmt(s['eval_img_s'])} | {_fmt(o['eval_img_s'])} | {_fmt(ev, 2)}x |")
    failed = [k for k, s in summary.items() if not s["ok"]]
    if failed:
        lines.append(f"\nfailed: {failed}")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(tables(p) for p in sys.argv[1:]))
