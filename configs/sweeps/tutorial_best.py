"""The search behind ``configs/tutorial_best.py``: ``configs/tutorial_fast.py``'s recipe trained
longer (at lr 0.1), image size x epochs, two seeds each, ranked on the validation split's loss (test accuracy
is reported, never ranked on). The two seeds of a setting train as one packed program.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/tutorial_best.py --workdir=runs/sweep_tutorial_best
"""

from cnnlab import sweep


def get_config():
    # tutorial_fast.py with flips + crops (the base of the sweep beside this file), at lr 0.1
    config = sweep.config_from_file("tutorial_fast.py", relative_to=__file__)
    config.optimizer.learning_rate = 0.1
    return config


def get_sweep():
    return sweep.Sweep(
        grid=sweep.product({"data.image_size": [64, 80]}, {"num_epochs": [30, 50]},
                           {"seed": [1, 2]}),
        metric="val/loss",
        mode="min",
        pack=2,
    )
