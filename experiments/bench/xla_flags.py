"""XLA CPU flags and other knobs on the cnnlab path: which flags this jaxlib accepts, and the
attempts run (each a variant of ``bench_cnnlab.py``, interleaved with the baseline by run.py).

    python experiments/bench/xla_flags.py            # probe the flags (an unknown flag aborts
                                                     # the process, so each runs in a subprocess)
    python experiments/bench/xla_flags.py --run      # probe, then run the attempts (~15 min)
    python experiments/bench/xla_flags.py --run --batches 32,128 --repeats 3

Results of ``--run``: ``experiments/bench/results_xla.json`` (+ ``.runs.jsonl``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

PROBE = [
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_mkl_dnn=true",  # the old name of the oneDNN flag
    "--xla_cpu_enable_xprof_traceme=false",
]

# name, env (';'-separated K=V; BENCH_CPUS pins the process), extra bench_cnnlab.py arguments
ATTEMPTS = [
    ("thunk-off", "XLA_FLAGS=--xla_cpu_use_thunk_runtime=false", ""),
    ("eigen-1thread", "XLA_FLAGS=--xla_cpu_multi_thread_eigen=false", ""),
    ("onednn", "XLA_FLAGS=--xla_cpu_use_onednn=true", ""),
    ("onednn-dot-fusion",
     "XLA_FLAGS=--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot", ""),
    ("xnnpack", "XLA_FLAGS=--xla_cpu_use_xnnpack=true", ""),
    ("fast-math", "XLA_FLAGS=--xla_cpu_enable_fast_math=true", ""),
    ("no-expensive-llvm", "XLA_FLAGS=--xla_llvm_disable_expensive_passes=true", ""),
    ("bf16", "", "--set mixed_precision=True"),
    ("steps_per_dispatch4", "", "--set steps_per_dispatch=4 --window 4 --warmup 4 --steps 20"),
    ("steps_per_dispatch4-rolled", "",
     "--set steps_per_dispatch=4 --window 4 --warmup 4 --steps 20 --scan-rolled"),
    ("1core", "BENCH_CPUS=0", ""),
]


def probe(flag: str) -> tuple[bool, str]:
    env = {**os.environ, "XLA_FLAGS": flag}
    code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: x @ x)(jnp.ones((4, 4))).sum()))"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if p.returncode == 0:
        return True, ""
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return False, lines[-1][-160:] if lines else f"rc {p.returncode}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run the attempts after the probe")
    p.add_argument("--batches", default="32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated attempt names")
    p.add_argument("--out", default=os.path.join(HERE, "results_xla.json"))
    args = p.parse_args()
    import jax

    print(f"jax {jax.__version__}; flags accepted by this jaxlib (each probed in a subprocess):\n")
    print("| flag | accepted |\n|---|---|")
    for flag in PROBE:
        ok, why = probe(flag)
        print(f"| `{flag}` | {'yes' if ok else 'no: ' + why} |", flush=True)
    if not args.run:
        return
    only = set(filter(None, args.only.split(",")))
    cmd = [sys.executable, os.path.join(HERE, "run.py"), "--systems", "cnnlab",
           "--batches", args.batches, "--repeats", str(args.repeats), "--steps", str(args.steps),
           "--out", args.out]
    for name, env, extra in ATTEMPTS:
        if not only or name in only:
            cmd += ["--variant", f"cnnlab-{name}:cnnlab:{env}:{extra}"]
    print("\n" + " ".join(cmd), flush=True)
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
