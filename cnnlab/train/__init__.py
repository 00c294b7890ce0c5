"""Training: config schema, the jitted train/eval steps, checkpoints, metrics and reports."""

from cnnlab.train.config import default_config, validate_config
from cnnlab.train.trainer import NonFiniteLossError, StopTraining, evaluate, train_and_evaluate

__all__ = [
    "NonFiniteLossError",
    "StopTraining",
    "default_config",
    "evaluate",
    "train_and_evaluate",
    "validate_config",
]
