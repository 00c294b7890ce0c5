"""Block type and batch size of ``configs/caltech101.py`` checked on the validation split.

Two choices still came from the early GPU search that ranked its runs on test figures: basic
rather than bottleneck residual blocks, and batch 64 (it tried batch 32 once). This sweep
checks both one factor at a time around the best point of the validation-ranked rechecks so
far (``caltech101_recheck_lr.py``: learning rate 0.2), at their budget (96x96, 60 epochs,
mixed precision, seed 0), ranked on validation mean per-class accuracy, never on test:

- bottleneck blocks (1x1 -> 3x3 -> 1x1, the 3x3 a quarter of the stage's width) at the same
  stage widths 64/128/256: on this CPU an epoch takes about as long as the basic net's (8-9 s
  at 96x96), so equal epochs is equal time, the comparison the early search made (runs r1 vs
  a). Bottlenecks at 256/512/1024 (3x3 widths equal to the basic net's) took about 25 s an
  epoch: at equal time they would get 22 of the 60 epochs, so they are not a contender for
  the hour and are not run;
- batch 32 with learning rate 0.1 (the linear scaling rule from batch 64 at 0.2).

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/caltech101_recheck_blocks_batch.py \\
        --workdir=runs/caltech101_recheck_blocks_batch

The point they are compared with is trial 1 of ``caltech101_recheck_lr.py`` (val MPCA 61.8%).
Result (2026-12-05, 8-11 minutes a trial): bottleneck blocks 51.0%, batch 32 / lr 0.1 63.1%,
which ``configs/caltech101.py`` adopted; the table is in experiments/caltech101/README.md.
"""

from cnnlab import sweep


def get_config():
    config = sweep.config_from_file("caltech101_recheck.py", relative_to=__file__)
    config.optimizer.learning_rate = 0.2
    return config


def get_sweep():
    one_factor_at_a_time = sweep.chain(
        sweep.point({"model.kwargs.bottleneck": True}),
        sweep.point({"batch_size": 32, "optimizer.learning_rate": 0.1}),
    )
    return sweep.Sweep(grid=one_factor_at_a_time, metric="val/mean_per_class_accuracy", mode="max",
                       pack=1)
