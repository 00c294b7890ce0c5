"""All 102 CALTECH-101 classes (tfds protocol) in about an hour on 2 CPU cores without native
bfloat16 (AVX2 only, e.g. AMD EPYC Zen 3): ``configs/caltech101.py``'s recipe in float32 at
96x96 for 84 epochs, the budget that fits the hour there.

``configs/caltech101.py`` (112x112, 230 epochs) needs bfloat16 to fit the hour; in float32 on
an AVX2-only CPU it takes about 3 h. This config keeps its model, optimizer, augmentation and
validation-chosen checkpoint, and spends the hour on smaller images (96x96 costs 413 MFLOPs a
forward image against 562) and fewer epochs. Measured result and time, under the AVX2 limits
of a newer CPU: experiments/caltech101/README.md ("An hour without native bfloat16").

    CALTECH101_DIR=../shared/data/caltech101/101_ObjectCategories \\
        cnnlab train --config=configs/caltech101_avx2_hour.py --workdir=runs/caltech101_avx2_hour
"""

from cnnlab.sweep import config_from_file


def get_config():
    config = config_from_file("caltech101.py", relative_to=__file__)
    config.mixed_precision = False  # float32: what "auto" picks without native bfloat16, and the faster one there
    config.data.image_size = 96
    config.num_epochs = 84
    config.eval_every_epochs = 21  # each evaluation reads the 6,084 test images twice (flips)
    return config
