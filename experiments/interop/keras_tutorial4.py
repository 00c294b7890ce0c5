"""A ``.keras`` file's model (``model.kwargs.path``, set on the command line) trained on the
Keras tutorial's 4 classes with ``configs/stridednet.py``'s data, split and augmentation; the
file's classifier is replaced by one for the 4 classes (``new_head``). Adam 1e-3 with cosine
decay, 15 epochs, 96x96 (see finetune_application.sh)."""

import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "stridednet_config", os.path.join(_HERE, "..", "..", "configs", "stridednet.py"))
_stridednet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stridednet)


def get_config():
    config = _stridednet.get_config()
    config.model.name = "keras"
    config.model.kwargs = ml_collections.ConfigDict({"path": "", "new_head": True})
    config.num_epochs = 15
    config.optimizer.learning_rate = 1e-3
    config.schedule.name = "cosine"
    config.normalization = "scale"
    return config
