"""Issue 27's other training levers, ranked by 3-fold cross-validation on the training images:
the second half of ``caltech101_folds_levers.py`` at the same proxy (its base config, its
folds), one factor at a time around the recipe:

- model EMA (decay 0.998 with the warm-up; about 8 of the proxy's 20 epochs);
- stochastic depth (``drop_path_rate`` 0.1, linear over the six blocks);
- a scale-and-aspect crop (``random_resized_crop``, scale 0.35-1) in place of pad-and-crop;
- RandAugment (2 ops at magnitude 9) before the crops;
- colour jitter (brightness, contrast and saturation 0.4) before the crops.

The recipe's own trial is ``caltech101_folds_levers.py``'s trial 0 (same config, folds and
seed; the engine is deterministic). The EMA trial also records its EMA weights' validation
metrics (``val_ema/``). The test split is not looked at to choose.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_folds_levers2.py --workdir=runs/caltech101_folds_levers2

Some of the levers only, by name (``ema``, ``drop_path``, ``random_resized_crop``,
``rand_augment``, ``color_jitter``), in the file's order:
``--config=configs/sweeps/caltech101_folds_levers2.py:random_resized_crop,rand_augment``.

Results: experiments/caltech101/README.md ("Fold-ranked lever search").
"""

from cnnlab import sweep


def get_config(levers: str | None = None):
    del levers  # the base config is the same for every selection of levers
    return sweep.config_from_file("caltech101_folds_levers.py", relative_to=__file__)


RECIPE_OPS = ("keras_affine", "random_crop", "mixup")
LEVERS = {
    "ema": {"ema.decay": 0.998},
    "drop_path": {"model.kwargs.drop_path_rate": 0.1},
    "random_resized_crop": {"data.augment.ops": ("keras_affine", "random_resized_crop", "mixup"),
                            "data.augment.random_resized_crop.scale": (0.35, 1.0)},
    "rand_augment": {"data.augment.ops": ("keras_affine", "rand_augment", *RECIPE_OPS[1:])},
    "color_jitter": {"data.augment.ops": ("keras_affine", "color_jitter", *RECIPE_OPS[1:])},
}


def get_sweep(levers: str | None = None):
    """Every lever, or those named in ``levers`` (comma-separated), one grid point each."""
    names = list(LEVERS) if levers is None else [n.strip() for n in levers.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown or not names:
        raise ValueError(f"caltech101_folds_levers2.py: unknown levers {unknown or levers!r}; "
                         f"choose from {', '.join(LEVERS)}")
    points = [sweep.point(LEVERS[n]) for n in LEVERS if n in names]
    return sweep.Sweep(grid=sweep.chain(*points), metric="val/mean_per_class_accuracy", mode="max",
                       pack=3, folds=3)
