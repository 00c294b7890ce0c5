"""The learning rate of ``configs/caltech101.py`` checked again on the validation split.

The early GPU search that set the recipe's SGD learning rate (0.1) compared 0.05 and 0.2
against it on test figures, before the validation split existed. This sweep runs those two
values at the budget of ``configs/sweeps/caltech101_recheck.py`` (96x96, 60 epochs, the
committed recipe otherwise), whose first trial is the committed learning rate at the same
settings; all three are ranked on validation mean per-class accuracy, never on test.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_recheck_lr.py --workdir=runs/caltech101_recheck_lr

Two trials of about 10 minutes each on 2 CPU cores, one seed. Result (2026-12-05): validation
MPCA 58.2% (0.05), 60.1% (0.1), 61.8% (0.2); the table is in experiments/caltech101/README.md.
"""

from cnnlab import sweep


def get_config():
    return sweep.config_from_file("caltech101_recheck.py", relative_to=__file__)


def get_sweep():
    return sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [0.05, 0.2]}),
                       metric="val/mean_per_class_accuracy", mode="max", pack=1)
