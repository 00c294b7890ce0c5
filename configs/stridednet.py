"""The Keras Conv2D tutorial, exactly: StridedNet on the 4 tutorial classes of CALTECH-101.

96x96 inputs, classes Faces/Leopards/Motorbikes/airplanes, stratified 75/25 split with seed
42, Adam lr 1e-4 with Keras' legacy decay 1e-4/epochs per step (the epochs of
``--config.num_epochs``), L2 5e-4 on conv kernels, he_normal, the tutorial's ImageDataGenerator
augmentation, batch 32, 50 epochs. The best
checkpoint is chosen on a validation split (10% of the training images); the test metrics are
reported as the tutorial reports them.

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab train --config=configs/stridednet.py --workdir=runs/stridednet

Quick check: ``--config.num_epochs=2``.
"""

from ml_collections import FieldReference

from cnnlab.data import augment_preset
from cnnlab.train import default_config

EPOCHS = 50
INIT_LR = 1e-4


def get_config():
    config = default_config()
    config.seed = 42
    config.num_epochs = EPOCHS
    config.batch_size = 32
    config.eval_batch_size = 128
    # 4 steps per jitted call (unrolled on CPU): 1.13x / 1.10x the single-step rate at batch
    # 32 / 128 on 2 CPU cores, for ~6 s more compilation (experiments/bench/README.md).
    config.steps_per_dispatch = 4

    config.data.source = "folder"
    config.data.classes = "tutorial4"
    config.data.split = "stratified"
    config.data.test_fraction = 0.25
    config.data.split_seed = 42
    config.data.image_size = 96
    config.data.resize = "stretch"
    config.data.val_fraction = 0.1  # carved from the 75%: selects the best checkpoint
    config.data.augment = augment_preset("tutorial")

    config.model.name = "stridednet"
    config.model.kwargs.kernel_initializer = "he_normal"
    config.model.kwargs.weight_decay = 5e-4

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = INIT_LR
    config.schedule.name = "keras_decay"
    # The tutorial's INIT_LR / EPOCHS with EPOCHS read when the config is resolved, so that
    # --config.num_epochs (or a sweep file) changes it too (a float reference: `1e-4 / ref`
    # would take the int type of num_epochs). INIT_LR stays a constant: the trials of a
    # learning-rate sweep then share one decay and still pack into one program.
    config.schedule.keras_decay.decay = FieldReference(INIT_LR) / config.get_ref("num_epochs")
    config.normalization = "scale"
    config.checkpoint.best_metric = "val/accuracy"
    return config
