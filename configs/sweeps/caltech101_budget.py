"""The validation-split search issue 14 asks for: how to spend one hour of 2-CPU-core training
on all 102 classes, ranked on validation mean per-class accuracy (3 of the 30 training images
per class), never on test.

Four points of about equal CPU cost (the committed recipe's ResNet at 96x96 runs about 200
epochs in the hour; training cost scales with the pixels and, past the stem, with the square
of the width), each with seeds 0 and 1 because the validation split is small (306 images):

- the committed width (64/128/256) at 96x96 for 200 epochs;
- narrower (48/96/192) at 96x96 for 300 epochs;
- the committed width at 80x80 for 260 epochs;
- the committed width at 112x112 for 140 epochs.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_budget.py --workdir=runs/caltech101_budget

Eight trials of 45-90 minutes each: days on this 2-core CPU, so it is meant for a lent GPU
(``--workers`` several at once). The winner on validation is then run on the 2-core CPU with
seeds 0-2 (``configs/sweeps/caltech101_seeds.py`` with the winner's values) for the figures
and the wall time; the epoch counts above are estimates to be checked by that wall time.
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("../caltech101.py", relative_to=__file__)
    config.mixed_precision = False  # the epoch counts above were set for float32's cost
    config.data.image_size = 96  # each point sets its own; the base as when this was written
    config.eval_every_epochs = 25
    config.batch_size = 64  # the recipe's batch when this ran (configs/caltech101.py now uses 32)
    return config


def get_sweep():
    budget_points = sweep.zip({
        "model.kwargs.stage_filters": [(64, 128, 256), (48, 96, 192), (64, 128, 256), (64, 128, 256)],
        "data.image_size": [96, 96, 80, 112],
        "num_epochs": [200, 300, 260, 140],
    })
    return sweep.Sweep(grid=sweep.product(budget_points, {"seed": [0, 1]}),
                       metric="val/mean_per_class_accuracy", mode="max", pack=1)
