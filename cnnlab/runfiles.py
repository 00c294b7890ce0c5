"""The names of the files and folders in a run directory, declared once (everything that reads or
writes a run uses these, so a name changes in one place).

No imports: training, inference, interop and the sweep all use it.
"""

CONFIG = "config.json"  #: the resolved config the run trains with
CONFIG_CHANGES = "config_changes.jsonl"  #: one line per accepted change on resume
CLASSES = "classes.json"  #: class names, in the order of the model's outputs
SPLIT = "split.json"  #: which images are in train / val / test
ENVIRONMENT = "environment.json"  #: versions, devices, precision and native-code choices
FORMULATIONS = "conv_formulations.json"  #: the convolution formulation per shape, pinned on resume
PREPROCESSING = "preprocessing.json"  #: normalization (and its statistics) inference needs
EXTENSIONS = "extensions.json"  #: user modules that registered what the config names
INIT_FROM = "init_from.json"  #: what config.init_from loaded, and which variables kept their fresh values
METRICS = "metrics.jsonl"  #: one JSON record per logged step and per evaluation
CONFUSION_LAST = "confusion_last.npy"  #: the last evaluation's test confusion matrix
TENSORBOARD = "tb"  #: TensorBoard event files
CHECKPOINTS = "checkpoints"  #: orbax checkpoints: CHECKPOINTS/LATEST and CHECKPOINTS/BEST
LATEST = "latest"
BEST = "best"
PLOT = "plot.png"  #: loss and accuracy curves
REPORT_JSON = "classification_report.json"
REPORT_TEXT = "classification_report.txt"
CONFUSION_PLOT = "confusion_matrix.png"


def eval_record(which: str) -> str:
    """``eval_best.json`` / ``eval_latest.json``: what ``cnnlab eval`` wrote for a checkpoint."""
    return f"eval_{which}.json"


def eval_confusion(split: str, which: str) -> str:
    """``confusion_test_best.npy``...: the ``[true, predicted]`` counts ``cnnlab eval`` wrote."""
    return f"confusion_{split}_{which}.npy"
