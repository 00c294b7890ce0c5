"""Smoke config: synthetic shapes, a small CNN, a few epochs; trains in well under a minute on CPU.

    cnnlab train --config=configs/smoke.py --workdir=runs/smoke

It is what the README's main command and the end-to-end tests run. To smoke-test another
model: ``--config.model.name=stridednet --config.model.kwargs.widths="(16, 32)"``.
"""

from cnnlab.train import default_config


def get_config():
    config = default_config()
    config.seed = 0
    config.num_epochs = 4
    config.batch_size = 32
    config.eval_batch_size = 64

    config.data.source = "synthetic"
    config.data.synthetic_num_classes = 4
    config.data.synthetic_per_class = 80
    config.data.image_size = 32
    config.data.split = "stratified"
    config.data.augment.ops = ("keras_affine",)
    config.data.augment.keras_affine.horizontal_flip = True

    config.model.name = "simple_cnn"
    config.model.kwargs.widths = (16, 32, 32)
    config.model.kwargs.dense_units = 64
    config.model.kwargs.weight_decay = 1e-4

    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    config.log_every_steps = 5
    return config
