"""Issue 27's augmentation levers, ranked by 3-fold cross-validation on the training images.

``configs/caltech101.py`` at a cheap proxy (64x64 inputs, 20 epochs, float32) with three
augmentation pipelines, one factor at a time:

- the recipe's (horizontal flip + 8-pixel pad-and-crop + mixup);
- the same with TrivialAugment Wide (one colour or geometric op per image) before the crops;
- the same with random erasing (p 0.25) after the crops.

Each trial trains three runs (``Sweep(folds=3)``): the 30 training images of every class are
dealt into three folds of 10, each run validates on one fold and trains on the other two, and
the trial's value is the mean validation mean-per-class accuracy over its folds. The three runs
of a trial share one compiled program (``pack=3``). The test split is not looked at.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_folds_levers.py --workdir=runs/caltech101_folds_levers

Results: experiments/caltech101/README.md ("Fold-ranked lever search").
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("../caltech101.py", relative_to=__file__)
    config.data.image_size = 64
    config.data.augment.random_crop.padding = 5  # the recipe's 8 of 112 pixels, scaled
    config.num_epochs = 20
    config.eval_every_epochs = 5
    config.schedule.warmup_epochs = 1.0
    config.mixed_precision = False  # the ranking does not depend on the precision; float32 is faster here
    config.progress = False
    return config


def get_sweep():
    levers = sweep.chain(
        sweep.point({"data.augment.ops": ("keras_affine", "random_crop", "mixup")}),
        sweep.point({"data.augment.ops": ("keras_affine", "trivial_augment", "random_crop", "mixup")}),
        sweep.point({"data.augment.ops": ("keras_affine", "random_crop", "random_erasing", "mixup")}),
    )
    return sweep.Sweep(grid=levers, metric="val/mean_per_class_accuracy", mode="max", pack=3, folds=3)
