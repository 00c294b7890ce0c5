"""Sweep benchmark: an 8-value learning-rate sweep of StridedNet on the tutorial's data.

Measures, in one session, for a fixed number of epochs:

  (a) 8 sequential ``cnnlab train`` runs (one process each),
  (b) ``cnnlab sweep --config=configs/sweeps/stridednet_lr.py`` (the 8 trials packed into one
      program),
  (c) the same 8 runs with Keras 3 ``model.fit`` on its JAX backend (one process, models built
      and fitted one after another, validation every epoch as cnnlab evaluates every epoch),

and where the time goes (process start-up and set-up, first epoch with compilation, later
epochs, reports), plus how the packed step's time grows with K (1, 2, 4, 8, 16).

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        python experiments/sweeps/bench.py --epochs 2 --json experiments/sweeps/cpu.json

``--methods a,b,c`` picks the parts, ``--ks 1,2,4,8,16`` the scaling points (``--ks ''`` skips
them), ``--augment tutorial`` turns on the tutorial's augmentation on both sides (Keras through
its preprocessing layers, which is not the same work); by default augmentation is off on both
sides so that the three compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # configs/sweeps/stridednet_lr.py


def _overrides(args) -> list[str]:
    out = [f"--config.num_epochs={args.epochs}", "--config.progress=False"]
    if args.augment == "none":
        out.append("--config.data.augment.ops=()")
    return out


def _timed_run(cmd: list[str], log_path: str) -> dict:
    """Runs ``cmd``, stamping each output line with seconds since the start."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    with open(log_path, "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:9.2f} {line}")
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return {"total": total, "lines": lines}


def _first(lines, needle):
    return next((t for t, text in lines if needle in text), None)


def _epoch_times(lines, prefix="epoch "):
    return [t for t, text in lines if text.lstrip().startswith(prefix) or f"] {prefix}" in text]


def run_sequential(args, work: str) -> dict:
    runs = []
    for i, lr in enumerate(LRS):
        wd = os.path.join(work, "a", f"lr{i}")
        cmd = [sys.executable, "-m", "cnnlab", "train", "--config=configs/stridednet.py", f"--workdir={wd}",
               f"--config.optimizer.learning_rate={lr}", *_overrides(args)]
        r = _timed_run(cmd, os.path.join(work, f"a_{i}.log"))
        start = _first(r["lines"], "Training ")
        epochs = _epoch_times(r["lines"])
        runs.append({
            "lr": lr, "total": r["total"],
            "startup_setup": start,  # python + imports + data + model + initial state (its compile)
            "first_epoch": epochs[0] - start,  # compiles the train and eval steps
            "later_epochs": (epochs[-1] - epochs[0]) / max(len(epochs) - 1, 1),
            "after_training": r["total"] - epochs[-1],  # reports, checkpoints closed, exit
        })
        print(f"(a) lr={lr:g}: {r['total']:.1f} s", flush=True)
    return {"wall": sum(r["total"] for r in runs), "runs": runs}


def run_sweep(args, work: str) -> dict:
    wd = os.path.join(work, "b")
    cmd = [sys.executable, "-m", "cnnlab", "sweep", "--config=configs/sweeps/stridednet_lr.py",
           f"--workdir={wd}", *_overrides(args)]
    if args.vmap_width:
        cmd.append(f"--vmap_width={args.vmap_width}")
    r = _timed_run(cmd, os.path.join(work, "b.log"))
    timing_line = next((text for _, text in r["lines"] if "pack timings:" in text), "")
    pack = {}
    for part in timing_line.split("pack timings:")[-1].split(","):
        if part.strip():
            name, value, _ = part.split()
            pack[name] = float(value)
    packing = _first(r["lines"], "packing trials")
    training = _first(r["lines"], "packed trials of")
    done = _first(r["lines"], "[sweep] done")
    epochs = sorted(set(round(t, 1) for t in _epoch_times(r["lines"])))
    return {
        "wall": r["total"], "startup_study": packing, "pack": pack,
        "until_training_line": training, "epoch_lines": epochs,
        "report": r["total"] - (done or r["total"]),
    }


KERAS_WORKER = r'''
import json, os, sys, time
t0 = time.perf_counter()
os.environ["KERAS_BACKEND"] = "jax"
import keras
from keras import layers
import numpy as np
from cnnlab import data as D, sweep
sys.path.insert(0, "experiments/bench")
import bench_keras  # the Keras StridedNet the speed benchmark uses
t_import = time.perf_counter() - t0
epochs, augment, lrs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
config = sweep.config_from_file("configs/stridednet.py")
t = time.perf_counter()
ds = D.load_dataset(config.data, verbose=False)
n = len(ds.train.labels) // 32 * 32  # cnnlab drops the last partial batch: same steps, one shape
x_train = ds.train.images[:n].astype("float32") / 255.0
y_train = keras.utils.to_categorical(ds.train.labels[:n], 4)
x_test = ds.test.images.astype("float32") / 255.0
y_test = keras.utils.to_categorical(ds.test.labels, 4)
t_data = time.perf_counter() - t

def stridednet():
    # Inputs are scaled to [0, 1] above; the head is he_normal like cnnlab's StridedNet.
    augmentation = [layers.RandomRotation(20 / 360, fill_mode="nearest"), layers.RandomZoom(0.15, fill_mode="nearest"),
                    layers.RandomTranslation(0.2, 0.2, fill_mode="nearest"), layers.RandomShear(0.15, 0.15),
                    layers.RandomFlip("horizontal")] if augment == "tutorial" else []
    return bench_keras.build(keras, 4, preprocessing=augmentation, head_initializer="he_normal")

class Stamps(keras.callbacks.Callback):
    def on_train_begin(self, logs=None): self.t = [time.perf_counter()]
    def on_epoch_end(self, epoch, logs=None): self.t.append(time.perf_counter())

runs = []
for lr in lrs:
    keras.utils.set_random_seed(42)
    t = time.perf_counter()
    model = stridednet()
    schedule = keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=1e-4 / 50)
    model.compile(optimizer=keras.optimizers.Adam(schedule, epsilon=1e-7), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    t_build = time.perf_counter() - t
    stamps = Stamps()
    t = time.perf_counter()
    hist = model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_data=(x_test, y_test),
                     validation_batch_size=128, shuffle=True, verbose=0, callbacks=[stamps])
    t_fit = time.perf_counter() - t
    e = np.diff(stamps.t)
    runs.append({"lr": lr, "build": t_build, "fit": t_fit, "first_epoch": float(e[0]),
                 "later_epochs": float(e[1:].mean()) if len(e) > 1 else None,
                 "val_accuracy": float(hist.history["val_accuracy"][-1])})
    print(f"(c) lr={lr:g}: {t_build + t_fit:.1f} s", file=sys.stderr, flush=True)
print(json.dumps({"import": t_import, "data": t_data, "runs": runs, "keras": keras.__version__}))
'''


def run_keras(args, work: str) -> dict:
    t0 = time.perf_counter()
    # The worker imports cnnlab for the data only: Keras keeps XLA's own CPU convolutions, as a
    # Keras user has them (cnnlab's import would otherwise move them to Eigen's kernels too).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNLAB_CPU_CONVOLUTIONS": "ynnpack"}
    proc = subprocess.run([sys.executable, "-c", KERAS_WORKER, str(args.epochs), args.augment, json.dumps(LRS)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    with open(os.path.join(work, "c.log"), "w") as f:
        f.write(proc.stderr + proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"Keras run failed; see {work}/c.log:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(proc.stderr.strip(), flush=True)
    return {"wall": wall, **out}


SCALING_WORKER = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from cnnlab import data as D, sweep
from cnnlab.sweep.space import apply_point
from cnnlab.train.experiment import build_experiment, resolve
from cnnlab.train.packing import build_program
ks, augment, lrs, steps, width = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
base = sweep.config_from_file("configs/stridednet.py")
if augment == "none":
    base.data.augment.ops = ()

def timed(fn, state, *rest):
    t = time.perf_counter(); state, _ = fn(state, *rest); jax.block_until_ready(state.step)
    first = time.perf_counter() - t
    ts = []
    for _ in range(steps):
        t = time.perf_counter(); state, _ = fn(state, *rest); jax.block_until_ready(state.step)
        ts.append(time.perf_counter() - t)
    return first, float(np.median(ts))

out = {"platform": jax.devices()[0].platform, "points": []}
exp = build_experiment(base)
batch = {k: jnp.asarray(v) for k, v in next(D.iterate_train(exp.dataset.train.images, exp.dataset.train.labels, 32, seed=0)).items()}
alone = build_program(exp, [exp.config])  # K = 1: the plain step of a single run
first, step = timed(alone.train_step, alone.init(), alone.h, batch)
out["alone"] = {"compile_and_first_step": first, "step": step}
print(f"alone: first {first:.2f} s, step {1000 * step:.1f} ms", file=sys.stderr, flush=True)
for k in ks:
    configs = [resolve(apply_point(base, {"optimizer.learning_rate": lrs[i % len(lrs)]})) for i in range(k)]
    prog = build_program(exp, configs, vmap_width=width or None)
    first, step = timed(prog.train_step, prog.init(), prog.h, batch)
    out["points"].append({"K": k, "vmap_width": prog.vmap_width, "compile_and_first_step": first,
                          "step": step, "step_per_trial": step / k})
    print(f"K={k}: first {first:.2f} s, step {1000 * step:.1f} ms ({1000 * step / k:.1f} ms/trial)", file=sys.stderr, flush=True)
print(json.dumps(out))
'''


def run_scaling(args, work: str, ks: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCALING_WORKER, json.dumps(ks), args.augment, json.dumps(LRS),
                           str(args.scaling_steps), str(args.vmap_width or 0)],
                          cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(work, "scaling.log"), "w") as f:
        f.write(proc.stderr + proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"scaling failed; see {work}/scaling.log:\n{proc.stderr[-2000:]}")
    print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(res: dict) -> str:
    rows = [("method", "wall s", "vs (b)", "where the time goes")]
    b = res.get("b", {}).get("wall")
    if "a" in res:
        a = res["a"]
        n = len(a["runs"])
        mean = lambda key: sum(r[key] for r in a["runs"]) / n  # noqa: E731
        rows.append(("(a) 8 x cnnlab train", f"{a['wall']:.1f}", f"{a['wall'] / b:.2f}x" if b else "",
                     f"per run: start-up+setup {mean('startup_setup'):.1f}, 1st epoch (compile) "
                     f"{mean('first_epoch'):.1f}, later epochs {mean('later_epochs'):.1f}, after {mean('after_training'):.1f}"))
    if b:
        p = res["b"]["pack"]
        rows.append(("(b) cnnlab sweep, packed", f"{b:.1f}", "1.00x",
                     f"start-up+study {res['b']['startup_study'] or 0:.1f}; pack: " +
                     ", ".join(f"{k} {v:.1f}" for k, v in p.items()) + f"; report {res['b']['report']:.1f}"))
    if "c" in res:
        c = res["c"]
        n = len(c["runs"])
        rows.append(("(c) 8 x Keras model.fit", f"{c['wall']:.1f}", f"{c['wall'] / b:.2f}x" if b else "",
                     f"import {c['import']:.1f}, data {c['data']:.1f}; per run: build {sum(r['build'] for r in c['runs']) / n:.1f}, "
                     f"1st epoch (compile) {sum(r['first_epoch'] for r in c['runs']) / n:.1f}, later epochs "
                     f"{sum(r['later_epochs'] or 0 for r in c['runs']) / n:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(r[i].ljust(widths[i]) for i in range(3)) + " | " + r[3] for r in rows]
    if "scaling" in res:
        s = res["scaling"]
        lines += ["", f"packed step vs K ({s['platform']}; alone: {1000 * s['alone']['step']:.1f} ms/step, "
                      f"compile {s['alone']['compile_and_first_step']:.1f} s)",
                  "K  | vmap width | compile+1st s | ms/step | ms/step/trial"]
        lines += [f"{p['K']:<2} | {p['vmap_width']:<10} | {p['compile_and_first_step']:13.1f} | {1000 * p['step']:7.1f} | "
                  f"{1000 * p['step_per_trial']:.1f}" for p in s["points"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--methods", default="a,b,c")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--scaling-steps", type=int, default=5)
    ap.add_argument("--augment", choices=("none", "tutorial"), default="none")
    ap.add_argument("--vmap-width", type=int, default=0, help="0: the sweep's default for the platform")
    ap.add_argument("--workdir", default=None, help="kept when given; a temporary folder otherwise")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not os.environ.get("CALTECH101_DIR"):
        sys.exit("Set CALTECH101_DIR to the 101_ObjectCategories folder.")
    work = args.workdir or tempfile.mkdtemp(prefix="cnnlab-sweep-bench-")
    os.makedirs(work, exist_ok=True)
    res: dict = {"epochs": args.epochs, "augment": args.augment, "lrs": LRS, "machine": platform.machine(),
                 "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
                 "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "workdir": work}
    # Prepare the data cache once, outside every measurement.
    subprocess.run([sys.executable, "-c", "from cnnlab import data, sweep; "
                    "data.load_dataset(sweep.config_from_file('configs/stridednet.py').data, verbose=False)"],
                   cwd=ROOT, check=True)
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    if "b" in methods:
        res["b"] = run_sweep(args, work)
        print(f"(b) sweep: {res['b']['wall']:.1f} s", flush=True)
    if "a" in methods:
        res["a"] = run_sequential(args, work)
    if "c" in methods:
        res["c"] = run_keras(args, work)
    ks = [int(k) for k in args.ks.split(",") if k]
    if ks:
        res["scaling"] = run_scaling(args, work, ks)
    res["bench_seconds"] = time.perf_counter() - t0
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for k in ("a", "b"):
        if k in res:
            res[k].pop("lines", None)
    print("\n" + _table(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
