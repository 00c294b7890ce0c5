"""cnnlab.data: CALTECH-101 (and synthetic) image data for the trainer.

Imports numpy, Pillow, tqdm, ml_collections and JAX only (no Flax, nothing from the
training code). The JAX parts (normalization, augmentation, device placement) are imported
on first use, so preparing data does not start JAX.

Entry point::

    from cnnlab.data import default_data_config, load_dataset
    cfg = default_data_config()           # ml_collections.ConfigDict, embed it in a train config
    cfg.data_dir = "../shared/data/caltech101/101_ObjectCategories"   # or $CALTECH101_DIR
    ds = load_dataset(cfg)                # Dataset(train, test, val, class_names, manifest)
    for batch in ds.train_batches(32, seed=0, start_step=0): ...   # {"image", "label", "mask"}
    for batch in ds.test.batches(64): ...   # padded last batch, mask marks real images

Config fields: :func:`cnnlab.data.config.data_schema` declares each one (default, type, check,
doc); ``cnnlab train --help`` lists them. Loading: unreadable or truncated files are skipped with
a warning naming them and listed in the manifest's ``skipped``; arrays are uint8 [N, H, W, 3].
Augmentation: ``data.augment.ops`` names registered ops (:mod:`cnnlab.data.augmentations`),
applied on device by the trainer through :func:`augment_pipeline`.
"""

from __future__ import annotations

from cnnlab._files import ENV_CACHE_DIR, cache_root
from cnnlab._lazy import lazy_attributes
from cnnlab.data.augmentations import (
    AUGMENT_OPS,
    AugmentPipeline,
    augment_pipeline,
    augment_preset,
    register_augment,
)
from cnnlab.data.config import CLASS_PRESETS, default_data_config, resolve_config
from cnnlab.data.dataset import Dataset, Split, decode_images, load_dataset, load_folds
from cnnlab.data.iterator import epoch_order, iterate_epoch, iterate_train, num_batches
from cnnlab.data.sources import ENV_DATA_DIR, TFDS_INSTALL_HINT, make_synthetic
from cnnlab.data.splits import (
    carve_validation,
    class_count_table,
    fold_validation,
    stratified_split,
    tfds_split,
)

# JAX-dependent names, imported on first access.
_LAZY = {
    **dict.fromkeys(
        ("normalize", "augment", "apply_transform", "sample_transform_params", "transform_matrices",
         "warp_affine", "random_crop", "mixup", "cutmix", "channel_mean_std", "random_affine"),
        "cnnlab.data.transforms",
    ),
    **dict.fromkeys(
        ("shard_batch", "prefetch_to_device", "batch_sharding", "data_mesh"), "cnnlab.data.device"
    ),
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "AUGMENT_OPS",
    "AugmentPipeline",
    "CLASS_PRESETS",
    "ENV_CACHE_DIR",
    "ENV_DATA_DIR",
    "TFDS_INSTALL_HINT",
    "Dataset",
    "Split",
    "augment_pipeline",
    "augment_preset",
    "cache_root",
    "carve_validation",
    "fold_validation",
    "class_count_table",
    "decode_images",
    "default_data_config",
    "epoch_order",
    "iterate_epoch",
    "iterate_train",
    "load_dataset",
    "load_folds",
    "make_synthetic",
    "num_batches",
    "register_augment",
    "resolve_config",
    "stratified_split",
    "tfds_split",
    *_LAZY,
]
