"""Regularization of the tutorial's StridedNet: dropout against augmentation strength.

The tutorial uses dropout 0.25 after each block and 0.5 in the head, and its ImageDataGenerator
settings (rotation 20, zoom 0.15, shifts 0.2, shear 0.15, horizontal flips). This grid crosses
the dropout rates (none, the tutorial's, double in the blocks) with the augmentation scaled by
0, 0.5, 1 and 2 (flips on throughout). All 12 trials differ only in dropout rates and
augmentation strengths, which are traced per trial, so they train as ONE compiled program
(``pack=12``) sharing every batch (one seed, one data order).

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/stridednet_regularization.py \\
        --workdir=runs/stridednet_regularization
"""

from cnnlab import sweep
from cnnlab.data import augment_preset

_TUTORIAL = augment_preset("tutorial").keras_affine
TUTORIAL_STRENGTHS = {
    f"data.augment.keras_affine.{k}": _TUTORIAL[k]
    for k in ("rotation_range", "zoom_range", "width_shift_range", "height_shift_range", "shear_range")
}
SCALES = [0.0, 0.5, 1.0, 2.0]


def get_config():
    config = sweep.config_from_file("../stridednet.py", relative_to=__file__)
    config.steps_per_dispatch = 1  # packed trials already fill one program
    # The base is the tutorial's preset (flips, fill mode); the swept ranges replace its ranges.
    return config


def get_sweep():
    augmentation = sweep.zip({k: [v * s for s in SCALES] for k, v in TUTORIAL_STRENGTHS.items()})
    dropout = sweep.zip({"model.kwargs.dropout": [0.0, 0.25, 0.5], "model.kwargs.head_dropout": [0.0, 0.5, 0.5]})
    return sweep.Sweep(grid=sweep.product(dropout, augmentation), metric="val/accuracy", mode="max", pack=12)
