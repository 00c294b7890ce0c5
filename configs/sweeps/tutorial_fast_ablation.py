"""What each part of ``configs/tutorial_fast.py``'s recipe gives: the recipe, then the recipe
with one part removed (test-time flips, label smoothing, flips + crops, the cosine schedule),
three seeds each (packed). Its validation accuracy chose to drop flips + crops from the
committed config (validation loss cannot compare label-smoothing settings); the test columns
are the README's ablation table, not a basis for any choice.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab sweep --config=configs/sweeps/tutorial_fast_ablation.py --workdir=runs/tutorial_fast_ablation
"""

from cnnlab import sweep


def get_config():
    # tutorial_fast.py with flips + crops: the base of the size/epochs/lr sweep beside this file
    return sweep.config_from_file("tutorial_fast.py", relative_to=__file__)


def get_sweep():
    parts = sweep.chain(
        sweep.point({}),
        sweep.point({"eval_flip": False}),
        sweep.point({"loss.label_smoothing": 0.0}),
        sweep.point({"data.augment.ops": ()}),
        sweep.point({"schedule.name": "constant", "schedule.warmup_epochs": 0.0}),
    )
    return sweep.Sweep(grid=sweep.product(parts, {"seed": [0, 1, 2]}), metric="val/loss", mode="min",
                       pack=3)
