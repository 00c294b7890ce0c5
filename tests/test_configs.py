"""Config files loaded as the CLI loads them (``config_flags``, overrides, validation)."""

from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from cnnlab.train.config import validate_config

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, *overrides: str):
    """``validate_config`` of ``path`` with ``--config.<key>=<value>`` overrides, parsed by
    ``config_flags.DEFINE_config_file`` as ``cnnlab train`` does."""
    argv = ["prog", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return validate_config(values.config)


@pytest.mark.parametrize("epochs", [None, 10, 3])
def test_stridednet_legacy_decay_follows_num_epochs(epochs):
    overrides = [] if epochs is None else [f"--config.num_epochs={epochs}"]
    config = _load(ROOT / "configs" / "stridednet.py", *overrides)
    assert config.num_epochs == (50 if epochs is None else epochs)
    assert config.schedule.name == "keras_decay"
    assert config.schedule.keras_decay.decay == pytest.approx(config.optimizer.learning_rate / config.num_epochs)


def test_stridednet_decay_can_still_be_overridden():
    config = _load(ROOT / "configs" / "stridednet.py", "--config.num_epochs=10", "--config.schedule.keras_decay.decay=0.01")
    assert config.schedule.keras_decay.decay == 0.01


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_config_file_validates(path):
    config = _load(path)
    assert config.num_epochs >= 1 and config.model.name


@pytest.mark.parametrize("epochs", [None, 5])
def test_tutorial_fast_evaluates_and_checkpoints_once_at_the_end(epochs):
    overrides = [] if epochs is None else [f"--config.num_epochs={epochs}"]
    config = _load(ROOT / "configs" / "tutorial_fast.py", *overrides)
    assert config.eval_every_epochs == config.checkpoint.every_epochs == config.num_epochs
    assert config.eval_flip and config.data.val_fraction > 0
    best = _load(ROOT / "configs" / "tutorial_best.py", *overrides)
    assert best.eval_every_epochs == 5 and best.num_epochs == (50 if epochs is None else epochs)
