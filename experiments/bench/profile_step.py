"""Where cnnlab's training step spends its time: per-layer, per-kind op times on CPU.

    python experiments/bench/profile_step.py --batch 32 --steps 160
    python experiments/bench/profile_step.py --config configs/caltech101.py --batch 64 --steps 40
    python experiments/bench/profile_step.py --script bench_flax.py --model cnnlab --batch 32 --steps 160

Runs ``bench_cnnlab.py`` (the real trainer, arguments passed through) under ``jax.profiler``
with XLA's HLO dump on, then reads the trace back with ``jax.profiler.ProfileData``: every XLA
op executed before the first evaluation is attributed, through the ``op_name`` metadata of the
compiled training program, to a layer (``Conv2D``, ``BatchNormalization``, ...), to the forward
or backward pass, and to its kind (a oneDNN convolution ``ffi_call``, a YNNPACK fusion, an XLA
loop fusion). Prints milliseconds per training step, summed over XLA's threads (two threads
can overlap, so the sum can exceed the wall time), and the largest single ops. ``--script bench_flax.py
--model cnnlab`` profiles cnnlab's layers in the plain one-step loop instead of the trainer.
The profiler slows the step by about 10%; shares are what it is for.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_TRACE_AND_RUN = """
import atexit, os, runpy, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[2])))))
import cnnlab.runtime  # noqa: E402

cnnlab.runtime.configure()  # before JAX starts its backend: the cnnlab commands' XLA:CPU flags
import jax
options = jax.profiler.ProfileOptions()
options.python_tracer_level = 0  # Python's own calls untraced: they would slow the host side
jax.profiler.start_trace(sys.argv[1], profiler_options=options)
atexit.register(jax.profiler.stop_trace)
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _layer(op_name: str) -> str:
    parts = [p for p in op_name.split("/") if re.match(r"^[A-Z][A-Za-z0-9]*_\d+$", p)]
    return re.sub(r"_\d+$", "", parts[-1]) if parts else "(step) " + op_name.split("/")[-1]


def _steps_per_dispatch(argv: list[str], script: str) -> int:
    """The config's steps per program call (the unrolled chunk), as bench_cnnlab.py sets it."""
    import importlib.util

    if script != "bench_cnnlab.py":
        return 1
    for i, a in enumerate(argv[:-1]):
        if a == "--set" and argv[i + 1].startswith("steps_per_dispatch="):
            return int(argv[i + 1].split("=", 1)[1])
    path = argv[argv.index("--config") + 1] if "--config" in argv else "configs/stridednet.py"
    spec = importlib.util.spec_from_file_location("profiled_config", os.path.join(HERE, "..", "..", path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.get_config().steps_per_dispatch)


def main() -> None:
    argv = sys.argv[1:]
    script = "bench_cnnlab.py"
    if "--script" in argv:
        i = argv.index("--script")
        script = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    work = tempfile.mkdtemp(prefix="cnnlab-profile-")
    trace, dump = os.path.join(work, "trace"), os.path.join(work, "hlo")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
    subprocess.run([sys.executable, "-c", _TRACE_AND_RUN, trace, os.path.join(HERE, script), *argv],
                   env=env, check=True, stdout=subprocess.DEVNULL)

    from jax.profiler import ProfileData

    # The training program: the largest optimized train-step module (the chunk of unrolled
    # steps), else the largest module (the plain loop's programs are not named train_step).
    modules = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    hlo_file = max([m for m in modules if "train_step" in m] or modules, key=os.path.getsize)
    hlo = open(hlo_file).read()
    meta = {m.group(1): m.group(2) for m in re.finditer(r"^\s*%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M)}
    data = ProfileData.from_file(glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True)[0])
    # The window: from the end of the training program's first call (its compilation) to the
    # first evaluation, so that set-up programs (initialization, `auto`'s timing runs) are out.
    start, end = 0, float("inf")
    for plane in data.planes:
        for line in plane.lines:
            if line.name != "python":
                continue
            programs: collections.Counter = collections.Counter()
            for e in line.events:
                if e.name.startswith("PjitFunction(") and e.name != "PjitFunction(eval_step)":
                    programs[e.name] += e.duration_ns
            if not programs:
                continue
            # the training program: train_step where it has that name (the trainer's), else the
            # longest in all (a host-side jitted op that waits on the step can take longer)
            named = [p for p in programs if "train_step" in p]
            train = max(named, key=programs.get) if named else programs.most_common(1)[0][0]
            calls = [e for e in line.events if e.name == train]
            if calls:
                first = max(calls, key=lambda e: e.duration_ns)
                start = first.start_ns + first.duration_ns
                evals = [e.start_ns for e in line.events if e.name == "PjitFunction(eval_step)"]
                end = min(evals) if evals else end
    events = [e for plane in data.planes for line in plane.lines
              if "Compiler" not in line.name and "codegen" not in line.name
              for e in line.events if start <= e.start_ns < end and e.name in meta]
    # Program calls in the window: the commonest count of an op's executions (most ops run once
    # per call; names shared with other programs, or ops in loops, run more often).
    program_calls = statistics.mode(collections.Counter(e.name for e in events).values())
    by_layer: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    for e in events:
        op = meta[e.name]
        kind = "oneDNN conv" if e.name.startswith("ffi_call") else re.sub(r"\.\d+$", "", e.name)
        direction = "backward" if "transpose(" in op else "forward"
        by_layer[(_layer(op), direction, kind)] += e.duration_ns
        by_op[(e.name, op)] += e.duration_ns
    n = program_calls * _steps_per_dispatch(argv, script)  # steps in the window
    total = sum(by_layer.values())
    print(f"{os.path.basename(hlo_file)}: {total / 1e6 / n:.1f} ms of XLA ops per training step ({n} steps)\n")
    print("| ms/step | share | layer | pass | kind |\n|---|---|---|---|---|")
    for (layer, direction, kind), ns in by_layer.most_common(30):
        print(f"| {ns / 1e6 / n:.2f} | {100 * ns / total:.1f}% | {layer} | {direction} | {kind} |")
    print("\nlargest ops:")
    for (name, op), ns in by_op.most_common(15):
        print(f"  {ns / 1e6 / n:6.2f} ms/step  {name:28s} {op[-80:]}")
    print(f"\ntrace and HLO kept in {work}")


if __name__ == "__main__":
    main()
