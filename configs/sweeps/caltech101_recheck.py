"""The recipe choices of the early GPU search, checked again on the validation split.

``configs/caltech101.py``'s model and augmentation (basic-block widths 64/128/256 with a
stem pool; flips + 8-pixel crops; mixup 0.2) were chosen by a search that ranked its runs on
test figures, before the validation split existed. This sweep repeats that search's three
comparisons one factor at a time around the committed recipe, at that search's budget (96x96,
60 epochs; mixed precision as committed), and ranks them on validation mean per-class
accuracy (3 of the 30 training images per class), never on test:

- the committed recipe;
- without mixup (flips and crops only);
- the narrower net the search started from (stages 32/64/128, no stem pool);
- the tutorial's affine augmentation (rotation 20, zoom 0.15, shifts 0.2, shear 0.15) added
  to the flips, crops and mixup.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_recheck.py --workdir=runs/caltech101_recheck

Four trials of about 10 minutes each on 2 CPU cores, one seed: a check of direction (the
validation split moves 0.33 points of MPCA per image), not a new search. The result is in
experiments/caltech101/README.md.
"""

from cnnlab import sweep
from cnnlab.data import augment_preset


def get_config():
    config = sweep.config_from_file("../caltech101.py", relative_to=__file__)
    config.data.image_size = 96
    config.num_epochs = 60
    config.eval_every_epochs = 20
    config.batch_size = 64  # the recipe's batch when this ran (configs/caltech101.py now uses 32)
    return config


def get_sweep():
    committed = get_config().data.augment.keras_affine
    tutorial_affine = {f"data.augment.keras_affine.{k}": v  # the preset's values that differ
                       for k, v in augment_preset("tutorial").keras_affine.items() if v != committed[k]}
    one_factor_at_a_time = sweep.chain(
        sweep.point({}),
        sweep.point({"data.augment.ops": ("keras_affine", "random_crop")}),
        sweep.point({"model.kwargs.stage_filters": (32, 64, 128), "model.kwargs.stem_pool": False}),
        sweep.point(tutorial_affine),
    )
    return sweep.Sweep(grid=one_factor_at_a_time, metric="val/mean_per_class_accuracy", mode="max",
                       pack=1)
