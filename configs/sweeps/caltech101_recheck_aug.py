"""The last augmentation choices of the early GPU search, checked on the validation split.

That search (ranked on test figures, before the validation split existed) also decided three
augmentation questions that ``caltech101_recheck.py`` did not repeat: 8-pixel pad-and-crop
kept (run p dropped it), mixup rather than cutmix (runs b vs c), and no affine warp rather
than a light one (run l: rotation 10, zoom 0.1, shifts 0.1; nearly tied with run h on test).
This sweep repeats them one factor at a time around the recipe as validation left it
(``caltech101_recheck_blocks_batch.py``'s winner: batch 32, lr 0.1), at the same budget
(96x96, 60 epochs, mixed precision, seed 0), ranked on validation mean per-class accuracy,
never on test:

- without the 8-pixel crops (flips + mixup);
- cutmix (alpha 1.0, as run c) instead of mixup;
- a light affine warp (rotation 10, zoom 0.1, shifts 0.1) added to flips, crops and mixup.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_recheck_aug.py --workdir=runs/caltech101_recheck_aug

The point they are compared with is trial 1 of ``caltech101_recheck_blocks_batch.py`` (the
same config; val MPCA 63.1%). Result (2026-12-05, about 11 minutes a trial): without crops
62.7%, cutmix 59.5%, light warp 63.1% (a tie: the recipe is kept); the table is in
experiments/caltech101/README.md.
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("caltech101_recheck.py", relative_to=__file__)
    config.batch_size = 32
    config.optimizer.learning_rate = 0.1
    return config


def get_sweep():
    light_affine = {f"data.augment.keras_affine.{k}": v for k, v in
                    {"rotation_range": 10.0, "zoom_range": 0.1, "width_shift_range": 0.1,
                     "height_shift_range": 0.1}.items()}
    one_factor_at_a_time = sweep.chain(
        sweep.point({"data.augment.ops": ("keras_affine", "mixup")}),
        sweep.point({"data.augment.ops": ("keras_affine", "random_crop", "cutmix")}),
        sweep.point(light_affine),
    )
    return sweep.Sweep(grid=one_factor_at_a_time, metric="val/mean_per_class_accuracy", mode="max",
                       pack=1)
