"""Runs the framework benchmark: every system x batch size, interleaved, each in its own process.

    python experiments/bench/run.py                 # everything, 3 repeats (~15 min on 2 cores)
    python experiments/bench/run.py --quick         # 1 repeat, fewer steps (a few minutes)
    python experiments/bench/run.py --systems cnnlab,flax --repeats 5

For repeat in 1..R: for system: for batch: one subprocess (``bench_<system>.py``), which prints
one JSON line. Writes every run (with the load average before and after it) and the medians to
``--out`` (default ``experiments/bench/results.json``) and prints a Markdown table with the
ratios of cnnlab to the others.

Systems: cnnlab, flax, keras-jax, torch-eager, torch-compile, keras-tf (the last one runs with
``--tf-python``, a separate virtualenv with tensorflow-cpu). ``--variant NAME:SYSTEM:ENV:ARGS``
adds a labelled variant of a system (used for the XLA-flag attempts), e.g.
``--variant 'cnnlab-bf16:cnnlab::--set mixed_precision=True'``,
``--variant 'cnnlab-onednn:cnnlab:XLA_FLAGS=--xla_cpu_use_onednn=true:'`` or
``--variant 'cnnlab-1core:cnnlab:BENCH_CPUS=0:'`` (``BENCH_CPUS`` pins that variant's process).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import common  # noqa: E402

ALL_SYSTEMS = ("cnnlab", "flax", "keras-jax", "torch-eager", "torch-compile", "keras-tf")
DEFAULT_TF_PYTHON = "/work/venv-tf/bin/python"


def system_command(system: str, tf_python: str) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    if system == "cnnlab":
        return [py, os.path.join(HERE, "bench_cnnlab.py")], {}
    if system == "flax":
        return [py, os.path.join(HERE, "bench_flax.py")], {}
    if system == "keras-jax":
        return [py, os.path.join(HERE, "bench_keras.py")], {"KERAS_BACKEND": "jax"}
    if system == "keras-tf":
        return [tf_python, os.path.join(HERE, "bench_keras.py")], {
            "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if system == "torch-eager":
        return [py, os.path.join(HERE, "bench_torch.py")], {}
    if system == "torch-compile":
        return [py, os.path.join(HERE, "bench_torch.py"), "--compile"], {}
    raise SystemExit(f"unknown system {system!r}; known: {ALL_SYSTEMS}")


def parse_variant(spec: str) -> dict:
    """``NAME:SYSTEM:ENV:ARGS``: ENV is ``K=V`` pairs separated by ``;``, ARGS a shell string."""
    name, system, env, extra = (spec.split(":", 3) + ["", ""])[:4]
    env_d = dict(kv.split("=", 1) for kv in env.split(";") if kv)
    return {"name": name, "system": system, "env": env_d, "args": shlex.split(extra)}


def run_one(entry: dict, batch: int, opts, log) -> dict:
    cmd, env_extra = system_command(entry["system"], opts.tf_python)
    cmd = cmd + ["--batch", str(batch), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
                 "--window", str(opts.window), "--eval-images", str(opts.eval_images),
                 "--eval-repeats", str(opts.eval_repeats), "--seed", str(opts.seed),
                 "--threads", str(opts.threads)] + entry["args"]
    env = {**os.environ, **env_extra, **entry["env"]}
    env.setdefault("PYTHONPATH", REPO)
    load_before = list(os.getloadavg())
    t = time.perf_counter()
    pre = None
    cpu_list = entry["env"].get("BENCH_CPUS", opts.cpus)
    if cpu_list:
        cpus = {int(c) for c in cpu_list.split(",")}
        pre = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=opts.timeout, preexec_fn=pre)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {opts.timeout}s", -9
    wall = time.perf_counter() - t
    result = None
    for line in out.splitlines():
        if line.startswith(common.RESULT_PREFIX):
            result = json.loads(line[len(common.RESULT_PREFIX):])
    record = {"name": entry["name"], "system": entry["system"], "batch": batch,
              "env": entry["env"], "args": entry["args"], "rc": rc, "wall_s": wall,
              "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())}
    if result is None:
        record["error"] = "\n".join(out.splitlines()[-15:])
    else:
        record["result"] = result
    log.write(json.dumps(record) + "\n")
    log.flush()
    return record


def summarize(runs: list[dict]) -> dict:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["name"], r["batch"]), []).append(r)
    summary = {}
    for (name, batch), rs in groups.items():
        ok = [r["result"] for r in rs if "result" in r]

        def med(key, ok=ok):
            vals = [x[key] for x in ok if x.get(key) is not None]
            return statistics.median(vals) if vals else None

        summary[f"{name}@{batch}"] = {
            "name": name, "batch": batch, "runs": len(rs), "ok": len(ok),
            "train_img_s": med("train_img_s"), "eval_img_s": med("eval_img_s"),
            "train_cpu_ms_per_img": med("train_cpu_ms_per_img"),
            "first_step_s": med("first_step_s"), "import_s": med("import_s"),
            "peak_rss_mb": med("peak_rss_mb"),
            "train_img_s_runs": [x["train_img_s"] for x in ok],
            "loadavg_1min": [r["loadavg_before"][0] for r in rs],
            "errors": [r["error"] for r in rs if "error" in r][:1],
        }
    return summary


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def table(summary: dict, names: list[str], batches: list[int]) -> str:
    lines = ["| system | batch | train img/s | train CPU ms/img | eval img/s | first step s (import s) | "
             "peak RSS MB | 1-min load (per repeat) | train runs img/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for batch in batches:
        for name in names:
            s = summary.get(f"{name}@{batch}")
            if s is None:
                continue
            if not s["ok"]:
                lines.append(f"| {name} | {batch} | failed | | | | | "
                             f"{', '.join(fmt(x, 1) for x in s['loadavg_1min'])} | |")
                continue
            lines.append(
                f"| {name} | {batch} | {fmt(s['train_img_s'])} | {fmt(s['train_cpu_ms_per_img'], 1)} | "
                f"{fmt(s['eval_img_s'])} | "
                f"{fmt(s['first_step_s'], 1)} ({fmt(s['import_s'], 1)}) | {fmt(s['peak_rss_mb'])} | "
                f"{', '.join(fmt(x, 1) for x in s['loadavg_1min'])} | "
                f"{', '.join(fmt(x) for x in s['train_img_s_runs'])} |")
    ratios = ["", "| cnnlab vs | batch | train (cnnlab / other) | eval (cnnlab / other) |",
              "|---|---|---|---|"]
    for batch in batches:
        c = summary.get(f"cnnlab@{batch}")
        if not c or not c["ok"]:
            continue
        for name in names:
            o = summary.get(f"{name}@{batch}")
            if name == "cnnlab" or not o or not o["ok"]:
                continue
            tr = c["train_img_s"] / o["train_img_s"] if o["train_img_s"] else None
            ev = c["eval_img_s"] / o["eval_img_s"] if o["eval_img_s"] else None
            ratios.append(f"| {name} | {batch} | {fmt(tr, 2)} | {fmt(ev, 2)} |")
    return "\n".join(lines + ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help=f"comma-separated, from {','.join(ALL_SYSTEMS)} ('' for none)")
    p.add_argument("--variant", action="append", default=[], help="NAME:SYSTEM:ENV:ARGS")
    p.add_argument("--batches", default="32,128")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--eval-images", type=int, default=1024)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / TensorFlow threads")
    p.add_argument("--cpus", default="", help="pin every run to these CPUs (e.g. '0'), via affinity")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--tf-python", default=os.environ.get("BENCH_TF_PYTHON", DEFAULT_TF_PYTHON))
    p.add_argument("--quick", action="store_true",
                   help="1 repeat, 10 timed steps, 512 eval images, no torch-compile (a few minutes)")
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    opts = p.parse_args()
    systems = [s for s in opts.systems.split(",") if s]
    if opts.quick:
        opts.repeats, opts.steps, opts.eval_images, opts.eval_repeats = 1, 10, 512, 2
        if opts.systems == p.get_default("systems"):
            systems = [s for s in systems if s != "torch-compile"]
    if "keras-tf" in systems and not os.path.exists(opts.tf_python):
        print(f"keras-tf skipped: no {opts.tf_python} (see README for the TensorFlow venv)")
        systems.remove("keras-tf")
    entries = [{"name": s, "system": s, "env": {}, "args": []} for s in systems]
    entries += [parse_variant(v) for v in opts.variant]
    batches = [int(b) for b in opts.batches.split(",")]

    runs = []
    log_path = os.path.splitext(opts.out)[0] + ".runs.jsonl"
    t0 = time.time()
    with open(log_path, "w") as log:
        for rep in range(opts.repeats):
            for entry in entries:
                for batch in batches:
                    r = run_one(entry, batch, opts, log)
                    runs.append(r)
                    res = r.get("result") or {}
                    print(f"[rep {rep + 1}/{opts.repeats}] {entry['name']:>16} b{batch:<4} "
                          f"train {fmt(res.get('train_img_s'))} img/s  eval {fmt(res.get('eval_img_s'))} "
                          f"img/s  first step {fmt(res.get('first_step_s'), 1)} s  "
                          f"rss {fmt(res.get('peak_rss_mb'))} MB  load {r['loadavg_before'][0]:.2f}"
                          + ("" if "result" in r else f"  FAILED (rc {r['rc']})"), flush=True)
    summary = summarize(runs)
    names = [e["name"] for e in entries]
    md = table(summary, names, batches)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        "duration_s": time.time() - t0,
        "options": vars(opts) | {"systems": systems},
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "note": "synthetic uint8 data from a fixed seed, no augmentation; see README.md",
    }
    with open(opts.out, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    print()
    print(md)
    print(f"\nwrote {opts.out} and {log_path} ({meta['duration_s'] / 60:.1f} min)")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
