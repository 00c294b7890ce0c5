"""Smoke sweep: a 2x2 grid (learning rate x seed) of the smoke CNN on synthetic shapes, packed
four at a time into one program; seconds on CPU.

    cnnlab sweep --config=configs/sweeps/smoke_grid.py --workdir=runs/smoke_grid

Trials run one at a time with ``--pack=1``; ``--workers=2`` runs two worker processes.
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("../smoke.py", relative_to=__file__)
    config.num_epochs = 2
    config.data.image_size = 16
    config.data.synthetic_per_class = 40
    config.progress = False
    return config


def get_sweep():
    return sweep.Sweep(
        grid=sweep.product({"optimizer.learning_rate": [1e-3, 3e-3]}, {"seed": [0, 1]}),
        metric="val/accuracy",
        mode="max",
        pack=4,
    )
