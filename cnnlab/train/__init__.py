"""Training: config schema, the jitted train/eval steps, the one loop for K >= 1 trials,
checkpoints, metrics and reports."""

from cnnlab.train import distill  # noqa: F401 (registers the built-in loss "distill")
from cnnlab.train.config import default_config, validate_config
from cnnlab.train.packing import NotPackable, TrialOutcome, pack_key
from cnnlab.train.trainer import (
    NonFiniteLossError,
    StopTraining,
    evaluate,
    train_and_evaluate,
    train_trials,
)

__all__ = [
    "NonFiniteLossError",
    "NotPackable",
    "StopTraining",
    "TrialOutcome",
    "default_config",
    "evaluate",
    "pack_key",
    "train_and_evaluate",
    "train_trials",
    "validate_config",
]
