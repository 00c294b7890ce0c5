"""Multi-view test-time augmentation, ranked on validation folds: each fold run of a trained
sweep trial evaluated again with every ``eval_views`` setting (with the run's own ``eval_flip``).

The runs are not trained again: ``cnnlab.train.evaluate`` evaluates each fold run's ``latest``
checkpoint (the last epoch, which the sweep's trial value reads) with the run's recorded config,
``eval_views`` replaced. The value per setting is the mean over the folds of the validation
mean per-class accuracy; the test figures are printed beside it, not used to choose. Outputs go to
a temporary directory; the runs are left as they were.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories python experiments/caltech101/tta_views.py \\
        runs/caltech101_folds_levers/trials/0000
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

VIEWS = ("single", "crops5", "scales3")
METRIC = "mean_per_class_accuracy"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trial_dir", help="a sweep trial's directory holding fold_<j> run directories")
    p.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated eval_views settings ({', '.join(VIEWS)})")
    args = p.parse_args()
    folds = sorted(glob.glob(os.path.join(args.trial_dir, "fold_*")))
    if not folds:
        sys.exit(f"tta_views: no fold_<j> run directories in {args.trial_dir!r}")
    import cnnlab.runtime

    cnnlab.runtime.configure()
    from cnnlab.train import evaluate
    from cnnlab.train.trainer import load_run_config

    rows = []
    for views in args.views.split(","):
        val, test, start = [], [], time.perf_counter()
        for fold in folds:
            config = load_run_config(fold)
            config.eval_views = views
            with tempfile.TemporaryDirectory() as out:
                metrics = evaluate(config, fold, which="latest", output_dir=out)
            val.append(100 * metrics[f"val/{METRIC}"])
            test.append(100 * metrics[f"test/{METRIC}"])
        rows.append((views, config.eval_flip, val, test, time.perf_counter() - start))
        print(f"{views}: val MPCA {statistics.mean(val):.1f} (folds {', '.join(f'{v:.1f}' for v in val)}), "
              f"test MPCA {statistics.mean(test):.1f}", flush=True)
    print("\n| eval_views | eval_flip | val MPCA, mean of folds | sd over folds | each fold | test MPCA (not used) | eval time |")
    print("|---|---|---|---|---|---|---|")
    for views, flip, val, test, seconds in rows:
        print(f"| {views} | {flip} | {statistics.mean(val):.1f}% | {statistics.stdev(val) if len(val) > 1 else 0:.1f} | "
              f"{', '.join(f'{v:.1f}' for v in val)} | {statistics.mean(test):.1f}% | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
