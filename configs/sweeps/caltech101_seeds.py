"""``configs/caltech101.py`` as committed, seeds 0, 1 and 2, one after another (each trial about
52 minutes on 2 CPU cores): the spread the issue asks for, with each trial's wall time in the
sweep's report. Ranked, like every sweep, on validation (mean per-class accuracy); the test
columns are the result.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_seeds.py --workdir=runs/caltech101_seeds
"""

from cnnlab import sweep


def get_config():
    return sweep.config_from_file("../caltech101.py", relative_to=__file__)


def get_sweep():
    return sweep.Sweep(grid=sweep.product({"seed": [0, 1, 2]}), metric="val/mean_per_class_accuracy",
                       mode="max", pack=1)
