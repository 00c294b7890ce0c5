"""An 8-value learning-rate sweep of the tutorial's StridedNet (the sweep benchmark's workload).

All 8 trials differ only in ``optimizer.learning_rate``, so they train as ONE compiled program
(``pack=8``), sharing every batch (one seed, one data order).

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/stridednet_lr.py --workdir=runs/stridednet_lr

The benchmark (``experiments/sweeps/bench.py``) runs it with ``--config.num_epochs=2``; one
trial at a time: ``--pack=1``.
"""

from cnnlab import sweep

LEARNING_RATES = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def get_config():
    config = sweep.config_from_file("../stridednet.py", relative_to=__file__)
    config.steps_per_dispatch = 1  # packed trials already fill one program
    config.num_epochs = 10
    return config


def get_sweep():
    return sweep.Sweep(
        grid=sweep.product({"optimizer.learning_rate": LEARNING_RATES}),
        metric="val/accuracy",
        mode="max",
        pack=8,
    )
