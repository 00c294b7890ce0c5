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

Config fields (``default_data_config()``; unknown fields or bad values raise ``ValueError``
naming the field):

Source
  ``source`` ("folder"): ``"folder"`` (the ``101_ObjectCategories/<class>/*.jpg`` tree or
      its archive), ``"synthetic"`` (generated shapes) or ``"tfds"`` (tensorflow-datasets'
      ``caltech101``; needs ``pip install "cnnlab[tfds]"``).
  ``data_dir`` (None): folder source location: the class root, a folder holding
      ``101_ObjectCategories/``, ``101_ObjectCategories.tar.gz``, ``caltech-101.zip`` (the
      distributed zip holding the tar.gz), or a folder holding one of those archives. Archives
      are extracted once, atomically, under ``<cache root>/extracted/``. When None, the
      environment variable ``CALTECH101_DIR`` is used. Only files named ``*.jpg`` are images,
      as in the tfds builder: ``BACKGROUND_Google/tmp`` (a JPEG without the suffix) is ignored
      and listed in the manifest's ``ignored_non_jpg``.
  ``classes`` ("tutorial4"): ``"all"``, a preset (``"tutorial4"`` = Faces, Leopards,
      Motorbikes, airplanes), a comma-separated string or a list of class (folder) names. Labels
      index the sorted (case-sensitive) class list, saved as ``classes.json``. The tfds source
      matches names case-insensitively and uses tfds' lower-case names; the synthetic source
      treats a preset like ``"all"``.
  ``drop_background`` (False): drop ``BACKGROUND_Google`` from the selection.
  ``max_per_class`` (0): keep at most this many images per class (the first ones in sorted
      file order); 0 keeps all.
  ``synthetic_num_classes`` (4, at most 64), ``synthetic_per_class`` (100),
      ``synthetic_seed`` (0): the synthetic source; classes are coloured shapes/textures
      (``circle_red``, ``square_green``, ...), deterministic from the seed.
  ``tfds_data_dir`` (None), ``tfds_manual_dir`` (None), ``tfds_download`` (False): where tfds
      keeps (or finds) its prepared data; the builder is only prepared when downloading is
      allowed or a manual dir is given (passed as ``DownloadConfig(manual_dir=...)``).

Split
  ``split`` ("stratified"): ``"stratified"``: the Keras tutorial's
      ``train_test_split(test_size, stratify=labels, random_state=split_seed)``, reproduced
      exactly (same indices and order as scikit-learn, without depending on it);
      ``"tfds"``: ``train_per_class`` images per class for training (seeded per class from the
      sorted file list), the rest for testing (tfds' own split for the tfds source).
  ``test_fraction`` (0.25): stratified test share, ``n_test = ceil(test_fraction * n)``.
  ``train_per_class`` (30): tfds protocol training images per class.
  ``val_fraction`` (0.0): validation share carved (stratified) from the training split.
  ``split_seed`` (42): seed of both protocols and of the validation carve.

Preprocessing (all part of the cache key)
  ``image_size`` (96): output size, an int or (height, width).
  ``resize`` ("stretch"): ``"stretch"`` (ignore aspect, like ``cv2.resize`` to (96, 96) in
      the tutorial), ``"crop"`` (shorter side to size, center crop) or ``"pad"`` (letterbox).
  ``resample`` ("bilinear"): Pillow filter (nearest, bilinear, bicubic, lanczos, box,
      hamming); Pillow antialiases when downscaling (unlike cv2's INTER_LINEAR).
  ``pad_value`` (0): letterbox colour for ``resize="pad"``.
  ``fast_decode`` (False): let the JPEG decoder downscale while decoding (faster, not
      bit-identical).
  Grayscale, CMYK, palette and RGBA images become RGB (alpha dropped); arrays are uint8
  [N, H, W, 3]. Unreadable or truncated files are skipped with a warning naming them and
  listed in the manifest's ``skipped``; a missing directory, an empty class folder or zero
  readable images raise an error saying where it looked.

Cache and workers
  ``cache_dir`` (None): cache root; else ``$CNNLAB_CACHE_DIR``; else ``~/.cache/cnnlab``.
      Prepared arrays live in ``<root>/prepared/<key>/`` (see :mod:`cnnlab.data.cache`).
  ``use_cache`` (True): read/write the cache (the folder source; synthetic and tfds data are
      built in memory).
  ``cache_verify`` ("full"): checksum the whole image array on every load (CRC32, ~0.1 s for
      the full dataset at 96x96) or only 256 sampled blocks plus the shape (``"sample"``).
  ``num_workers`` (-1): decoding threads; -1 = all cores available to the process, 0 = in
      the calling thread. Pillow releases the GIL while decoding and resizing.

Augmentation (``augment`` sub-config, applied on device by the trainer through
:func:`make_augment_fn` / :func:`make_batch_augment_fn`)
  ``preset`` ("none"): ``"none"`` or ``"tutorial"`` (rotation 20, zoom 0.15, width/height
      shift 0.2, shear 0.15, horizontal flip, fill nearest); fields that differ from their
      default override the preset.
  ``rotation_range``, ``width_shift_range``, ``height_shift_range``, ``shear_range``,
      ``zoom_range``, ``horizontal_flip``, ``vertical_flip``, ``fill_mode``
      (nearest|reflect|wrap|constant), ``cval``: Keras ``ImageDataGenerator`` semantics (see
      :mod:`cnnlab.data.transforms`). All zero/False is the exact identity.
  ``random_crop_padding`` (0), ``random_crop_fill`` ("constant"|"reflect"|"edge"):
      pad-and-crop.
  ``mixup_alpha`` (0.0), ``cutmix_alpha`` (0.0): label-mixing augmentations.
"""

from __future__ import annotations

from cnnlab._lazy import lazy_attributes
from cnnlab.data.cache import ENV_CACHE_DIR, cache_root
from cnnlab.data.config import (
    CLASS_PRESETS,
    augment_preset,
    default_augment_config,
    default_data_config,
    resolve_augment_config,
    resolve_config,
)
from cnnlab.data.dataset import Dataset, Split, decode_images, load_dataset
from cnnlab.data.iterator import epoch_order, iterate_epoch, iterate_train, num_batches
from cnnlab.data.sources import ENV_DATA_DIR, TFDS_INSTALL_HINT, make_synthetic
from cnnlab.data.splits import carve_validation, class_count_table, stratified_split, tfds_split

# JAX-dependent names, imported on first access.
_LAZY = {
    "normalize": "cnnlab.data.transforms",
    "augment": "cnnlab.data.transforms",
    "apply_transform": "cnnlab.data.transforms",
    "sample_transform_params": "cnnlab.data.transforms",
    "transform_matrices": "cnnlab.data.transforms",
    "warp_affine": "cnnlab.data.transforms",
    "random_crop": "cnnlab.data.transforms",
    "mixup": "cnnlab.data.transforms",
    "cutmix": "cnnlab.data.transforms",
    "channel_mean_std": "cnnlab.data.transforms",
    "make_augment_fn": "cnnlab.data.transforms",
    "make_batch_augment_fn": "cnnlab.data.transforms",
    "TUTORIAL_AUGMENT": "cnnlab.data.transforms",
    "shard_batch": "cnnlab.data.device",
    "prefetch_to_device": "cnnlab.data.device",
    "batch_sharding": "cnnlab.data.device",
    "data_mesh": "cnnlab.data.device",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "CLASS_PRESETS",
    "ENV_CACHE_DIR",
    "ENV_DATA_DIR",
    "TFDS_INSTALL_HINT",
    "Dataset",
    "Split",
    "augment_preset",
    "cache_root",
    "carve_validation",
    "class_count_table",
    "decode_images",
    "default_augment_config",
    "default_data_config",
    "epoch_order",
    "iterate_epoch",
    "iterate_train",
    "load_dataset",
    "make_synthetic",
    "num_batches",
    "resolve_augment_config",
    "resolve_config",
    "stratified_split",
    "tfds_split",
    *_LAZY,
]
