"""What each part of ``configs/tutorial_fast.py``'s recipe gives: the recipe, then the recipe
with one part removed (test-time flips, label smoothing, flips + crops, the cosine schedule),
three seeds each (packed). Ranked on validation loss like every sweep; the README reads the
test columns as an ablation, chosen nothing from them.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/tutorial_fast_ablation.py --workdir=runs/tutorial_fast_ablation
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("../tutorial_fast.py", relative_to=__file__)
    # flips + 4-pixel pad-and-crop, as tutorial_fast.py had when this search ran
    config.data.augment.ops = ("keras_affine", "random_crop")
    config.data.augment.keras_affine.horizontal_flip = True
    config.data.augment.random_crop.padding = 4
    return config


def get_sweep():
    parts = sweep.chain(
        sweep.point({}),
        sweep.point({"eval_flip": False}),
        sweep.point({"loss.label_smoothing": 0.0}),
        sweep.point({"data.augment.ops": ()}),
        sweep.point({"schedule.name": "constant", "schedule.warmup_epochs": 0.0}),
    )
    return sweep.Sweep(grid=sweep.product(parts, {"seed": [0, 1, 2]}), metric="val/loss", mode="min",
                       pack=3)
