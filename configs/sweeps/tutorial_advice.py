"""The Keras Conv2D tutorial's advice, tested on its own data (CALTECH-101, 4 classes, 96 px).

One factor at a time around the tutorial's StridedNet (``configs/stridednet.py``: 32-64-128
filters, 3x3 kernels, strided convolutions, he_normal, L2 5e-4), each point with 3 seeds:

* "start with 32-64-128 filters": widths 16-32-64 and 64-128-256;
* "he_normal for deep nets": glorot_uniform instead;
* "L2 of 1e-4 to 1e-3": L2 0, 1e-4 and 1e-3 (5e-4 is the baseline);
* "strided convolution instead of pooling": the same stack with 2x2 max pooling (simple_cnn;
  its head has no batch norm and 256 units, so this compares the tutorial's two networks);
* "3x3 below 128 px": the pooling network with 3x3, 5x5 and 7x7 kernels.

Trials that differ only in seed and L2 are packed into one program (``pack``).

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/tutorial_advice.py --workdir=runs/tutorial_advice

Quicker: ``--config.num_epochs=10``; more machines: the same command with
``--storage=postgresql://user@host/db`` on each.
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("../stridednet.py", relative_to=__file__)
    config.steps_per_dispatch = 1  # packed trials already fill one program
    return config


def get_sweep():
    advice = sweep.chain(
        sweep.point({}),  # the tutorial's network
        sweep.product({"model.kwargs.weight_decay": [0.0, 1e-4, 1e-3]}),
        sweep.product({"model.kwargs.widths": [(16, 32, 64), (64, 128, 256)]}),
        sweep.product({"model.kwargs.kernel_initializer": ["glorot_uniform"]}),
        sweep.product({"model.name": ["simple_cnn"]}, {"model.kwargs.kernel_size": [3, 5, 7]}),
    )
    return sweep.Sweep(
        grid=sweep.product(advice, {"seed": [0, 1, 2]}),
        metric="val/accuracy",
        mode="max",
        pack=6,
    )
