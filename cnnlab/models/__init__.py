"""Models by name, built only from `cnnlab.nn` layers.

>>> from cnnlab import models
>>> model = models.get_model("stridednet", num_classes=4)

Every model maps ``[N, H, W, 3]`` float images to ``[N, num_classes]`` logits (the softmax of
the Keras models lives in the loss), takes ``training: bool`` and uses the ``"dropout"`` PRNG
stream and the ``"batch_stats"`` collection. A user adds one from their own module (imported by
their config file) with ``@cnnlab.models.register("my_net", traceable=(...))``.
"""

from cnnlab.models.inception import InceptionNet
from cnnlab.models.keras_file import KerasFile
from cnnlab.models.registry import (
    MODELS,
    get_model,
    model_fields,
    model_schema,
    register,
    traceable_fields,
)
from cnnlab.models.resnet import ResNet
from cnnlab.models.simple_cnn import SimpleCNN
from cnnlab.models.stridednet import StridedNet

__all__ = ["MODELS", "InceptionNet", "KerasFile", "ResNet", "SimpleCNN", "StridedNet", "get_model", "model_fields",
           "model_schema", "register", "traceable_fields"]
