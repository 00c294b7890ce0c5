"""cnnlab through its trainer: ``cnnlab.train.trainer.train(config, workdir)``.

The config is ``configs/stridednet.py`` (``--config`` picks another, e.g. the ResNet of
``configs/caltech101.py``) with the benchmark's settings: 102 classes, no
augmentation, a constant Adam 1e-4 (the tutorial's per-step decay is negligible work), one
epoch over the benchmark's training images, ``eval_batch_size`` = the batch under test,
``log_every_steps`` = the timing window, no progress bar. Everything else is the normal
trainer: host batches -> ``prefetch_to_device`` -> the jitted, donated train step (on-device
normalization, L2 penalty, non-finite guard, epoch sums), metrics.jsonl + TensorBoard, an
evaluation and an orbax checkpoint at the epoch end, the run's reports.

Two hooks, neither touching the compute:

* the dataset: ``cnnlab.data.load_dataset`` is replaced by the benchmark's arrays (the built-in
  synthetic source has at most 64 classes, and every system must see the same images);
* the first step: the trainer's log condition also fires after step 1, so the time to the first
  step (compilation included) can be read; the later windows are the trainer's own
  ``log_every_steps`` windows, and their ``images_per_sec`` is what this reports.

``--scan-rolled`` (an experiment, not the trainer as shipped) keeps the trainer's ``lax.scan``
over a chunk of ``steps_per_dispatch`` steps a rolled loop; the trainer unrolls it on CPU, see
scan_check.py for why.

Evaluation is timed with the trainer's own ``evaluate_trials`` on the trained state (one
compiling pass, then ``eval_repeats`` timed passes). Extra config overrides: ``--set key=value``
(e.g. ``--set mixed_precision=True --set steps_per_dispatch=4``).
"""

from __future__ import annotations

import ast
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set(config, assignment: str) -> None:
    key, _, raw = assignment.partition("=")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--config", default="configs/stridednet.py",
                   help="the config file whose model and optimizer are timed (e.g. configs/caltech101.py)")
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--scan-rolled", action="store_true",
                   help="experiment: the trainer's lax.scan (steps_per_dispatch > 1) as a rolled loop")
    args = p.parse_args()
    common.check_args(args)
    t0 = time.perf_counter()
    sys.path.insert(0, REPO)
    import importlib.util

    import cnnlab.runtime

    cnnlab.runtime.configure()  # what the cnnlab commands do first, before JAX starts
    import jax
    import numpy as np

    from cnnlab import data as data_lib
    from cnnlab.train import trainer
    from cnnlab.train.writers import read_metrics

    import_s = time.perf_counter() - t0

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_epochs = 1
    config.batch_size = args.batch
    config.eval_batch_size = args.batch
    config.seed = args.seed
    config.data.source = "synthetic"  # validated only; the arrays below replace the loader
    config.data.augment.ops = ()
    config.data.val_fraction = 0.0  # the arrays below have no validation split
    config.checkpoint.best_metric, config.checkpoint.best_mode = "train/loss", "min"
    config.schedule.name = "constant"
    config.schedule.keras_decay.decay = 0.0
    config.log_every_steps = args.window
    config.progress = False
    for assignment in args.set:
        _set(config, assignment)

    x_train, y_train, x_eval, y_eval = common.make_data(args)
    names = [f"class_{i:03d}" for i in range(common.NUM_CLASSES)]

    def split(images, labels):
        idx = np.arange(len(labels))
        return data_lib.Split(images, labels, idx, [f"{i}.jpg" for i in idx])

    def load_dataset(cfg, verbose=True):
        return data_lib.Dataset(
            train=split(x_train, y_train), test=split(x_eval, y_eval), val=None,
            class_names=names, manifest={"source": "bench", "skipped": []}, config=data_lib.resolve_config(cfg),
        )

    data_lib.load_dataset = load_dataset
    if args.scan_rolled:  # the trainer's chunk scan asks for chunk_unroll(); force a rolled loop
        from cnnlab.train import steps as steps_lib

        steps_lib.chunk_unroll = trainer.chunk_unroll = lambda: 1
    crossed = trainer._crossed
    log_every = config.log_every_steps

    def crossed_or_first(previous, step, every):
        return crossed(previous, step, every) or (every == log_every and previous == 0)

    trainer._crossed = crossed_or_first

    written: dict[int, float] = {}
    cpu_at: dict[int, float] = {}

    class TimedWriter(trainer.MetricWriter):
        def write(self, kind, step, values):
            super().write(kind, step, values)
            if kind == "train":
                written[int(step)] = time.perf_counter()
                cpu_at[int(step)] = common.cpu_seconds()

    trainer.MetricWriter = TimedWriter

    workdir = args.workdir or tempfile.mkdtemp(prefix="cnnlab-bench-")
    t_build = time.perf_counter()
    state, _ = trainer.train(config, workdir)
    train_wall_s = time.perf_counter() - t_build
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == "train"]
    first_step_s = written[records[0]["step"]] - t_build
    # each record's images_per_sec covers (previous record, this record]: keep the windows that
    # start after the warm-up and end within the timed steps
    train_rates = [
        r["images_per_sec"] for prev, r in zip(records, records[1:])
        if prev["step"] >= args.warmup and r["step"] <= args.warmup + args.steps
    ]

    lo, hi = args.warmup, args.warmup + args.steps
    cpu_ms = (1e3 * (cpu_at[hi] - cpu_at[lo]) / ((hi - lo) * args.batch)
              if lo in cpu_at and hi in cpu_at else None)

    exp = trainer.build_experiment(config)
    from cnnlab.train.packing import build_program

    program = build_program(exp, [exp.config])

    def eval_pass():
        t = time.perf_counter()
        trainer.evaluate_trials(exp, program, state)  # the test split only: no val here
        return time.perf_counter() - t

    eval_first_s = eval_pass()
    eval_rates = [len(y_eval) / eval_pass() for _ in range(args.eval_repeats)]
    common.report("cnnlab", args, import_s=import_s, first_step_s=first_step_s,
                  train_rates=train_rates, eval_rates=eval_rates, eval_first_s=eval_first_s,
                  train_cpu_ms_per_img=cpu_ms,
                  extra={"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                         "overrides": args.set, "final_loss": records[-1].get("loss"),
                         "train_wall_s": train_wall_s,
                         "first_record_step": records[0]["step"]})


if __name__ == "__main__":
    main()
