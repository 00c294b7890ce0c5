"""Bayesian (TPE) search over StridedNet's learning rate, L2 and widths on the tutorial data,
with median pruning on the per-epoch validation accuracy.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/stridednet_tpe.py --workdir=runs/stridednet_tpe

Several workers share the study (``--workers 2`` here, or the same command with
``--storage=postgresql://...`` on several machines); TPE then proposes with a constant liar for
the trials still running.
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("../stridednet.py", relative_to=__file__)
    config.steps_per_dispatch = 1  # packed trials already fill one program
    config.num_epochs = 20
    return config


def get_sweep():
    return sweep.Sweep(
        space={
            "optimizer.learning_rate": sweep.loguniform(1e-5, 1e-2),
            "model.kwargs.weight_decay": sweep.loguniform(1e-5, 1e-2),
            "model.kwargs.widths": sweep.choice([(16, 32, 64), (32, 64, 128), (64, 128, 256)]),
        },
        sampler="tpe",
        num_trials=30,
        metric="val/accuracy",
        mode="max",
        pruner="median",
        pruner_kwargs={"n_startup_trials": 5, "n_warmup_steps": 5},
        sampler_kwargs={"n_startup_trials": 8},
    )
