"""Helpers shared by the test modules (importable as ``helpers``: see conftest.py)."""

import os
import pathlib

import pytest

from cnnlab import sweep
from cnnlab.train.writers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fast_only(values, *fast):
    """Parametrize ``values``: those in ``fast`` run in the default test command, the others
    only under ``-m slow`` (variants of a case the fast ones cover, kept for CI's slow step)."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow, id=str(v)) for v in values]
SMOKE = str(ROOT / "configs" / "smoke.py")

# configs/smoke.py shrunk to seconds per run; exec'd with the config as ``c`` (also in subprocesses).
TINY = """
c.num_epochs = 2
c.data.image_size = 16
c.data.synthetic_per_class = 40
c.model.kwargs.widths = (8,)
c.model.kwargs.dense_units = 16
c.progress = False
c.checkpoint.every_steps = 2
c.data.val_fraction = 0.1
"""


def tiny_config():
    c = sweep.config_from_file(SMOKE)
    exec(TINY, {"c": c})
    return c


def epoch_records(trial_dir):
    return [r for r in read_metrics(os.path.join(trial_dir, "metrics.jsonl")) if r["kind"] == "epoch"]


def assert_same_epoch_records(packed_dir, alone_dir, tag):
    """A packed trial's epoch records equal those of the same config trained alone (epochs 1
    and 2, same keys, floats within rel 1e-4); returns the packed records."""
    packed, alone = epoch_records(packed_dir), epoch_records(alone_dir)
    assert [r["epoch"] for r in packed] == [r["epoch"] for r in alone] == [1, 2]
    for p, a in zip(packed, alone):
        assert p.keys() == a.keys()
        for key in a:
            expected = pytest.approx(a[key], rel=1e-4, abs=1e-6) if isinstance(a[key], float) else a[key]
            assert p[key] == expected, (tag, p["epoch"], key)
    return packed


def train_packed_and_alone(configs, tmp_path):
    """Trains ``configs`` packed (``tmp_path/packed<k>``), then each alone (``alone<k>``), and
    checks each packed trial's epoch records equal its own run's; returns the packed records."""
    from cnnlab.train import train_and_evaluate, train_trials

    outcomes, _ = train_trials(configs, [str(tmp_path / f"packed{k}") for k in range(len(configs))])
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    records = []
    for k, c in enumerate(configs):
        train_and_evaluate(c, str(tmp_path / f"alone{k}"))
        records.append(assert_same_epoch_records(str(tmp_path / f"packed{k}"), str(tmp_path / f"alone{k}"), k))
    return records
