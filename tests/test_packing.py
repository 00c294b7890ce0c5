"""One loop for K >= 1 trials: a pack of one is a plain run, packed trials equal each trained
alone, the pack key, finished and resumed trials in one group, the trial axis over devices."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import (
    TINY,
    assert_same_epoch_records,
    epoch_records,
    tiny_config,
    train_packed_and_alone,
)

from cnnlab import sweep
from cnnlab.schema import copy_config
from cnnlab.sweep.space import apply_point
from cnnlab.train import StopTraining, pack_key, train_and_evaluate, train_trials
from cnnlab.train.experiment import build_experiment, resolve
from cnnlab.train.packing import build_program, traceable_values, varying

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.py")

AFFINE = "data.augment.keras_affine."
# Augmentation strengths traced per trial: a rotation of 0 against 15 degrees, zoom, a
# fractional against a pixel shift, mixup's alpha.
AUGMENT_POINTS = (
    {AFFINE + "rotation_range": 0.0, AFFINE + "zoom_range": 0.1, AFFINE + "width_shift_range": 0.1,
     "data.augment.mixup.alpha": 0.2},
    {AFFINE + "rotation_range": 15.0, AFFINE + "zoom_range": 0.0, AFFINE + "width_shift_range": 2.0,
     "data.augment.mixup.alpha": 0.4},
)
AUGMENT_SAME = {AFFINE + "zoom_range": 0.1, AFFINE + "rotation_range": 10.0, AFFINE + "width_shift_range": 3.0,
                AFFINE + "height_shift_range": 0.2, AFFINE + "shear_range": 5.0}
AUGMENT_DIFFERENT = {AFFINE + "vertical_flip": True, AFFINE + "fill_mode": "reflect",
                     "data.augment.ops": ("keras_affine", "random_crop")}


def test_a_group_of_one_is_a_plain_run_without_a_trial_axis():
    config = resolve(tiny_config())
    exp = build_experiment(config)
    prog = build_program(exp, [config])
    state = prog.init()
    assert prog.size == 1 and state.step.shape == ()
    # the nonzero traceable fields are traced scalars, as in a packed program (traced_values)
    assert set(prog.h) == {k for k, v in traceable_values(config).items() if v != 0}
    assert "optimizer.learning_rate" in prog.h and all(v.shape == () for v in prog.h.values())
    assert prog.trials(state) == (state,)


def test_packed_trials_differing_in_traced_fields_equal_each_alone(tmp_path):
    # Learning rate, Adam's b1, the L2 factor (0 in one trial), dropout rates (0 in one trial),
    # augmentation strengths and the seed (so the data order) are traced per trial.
    base = tiny_config()
    base.model.name = "stridednet"
    base.model.kwargs = {"widths": (8,), "dense_units": 16, "stem_filters": 4, "weight_decay": 1e-4}
    base.data.image_size = 24
    base.data.augment.ops = ("keras_affine", "mixup")
    points = [
        {"optimizer.learning_rate": 3e-3, "optimizer.adam.b1": 0.9, "model.kwargs.weight_decay": 0.0,
         "model.kwargs.dropout": 0.0, "model.kwargs.head_dropout": 0.5, "seed": 0, **AUGMENT_POINTS[0]},
        {"optimizer.learning_rate": 1e-3, "optimizer.adam.b1": 0.8, "model.kwargs.weight_decay": 1e-3,
         "model.kwargs.dropout": 0.3, "model.kwargs.head_dropout": 0.0, "seed": 1, **AUGMENT_POINTS[1]},
    ]
    configs = [resolve(apply_point(base, p)) for p in points]
    assert len({pack_key(c) for c in configs}) == 1
    assert sorted(varying(configs)) == sorted(k for k in points[0] if k != "seed")
    outcomes, timings = train_trials(configs, [str(tmp_path / f"packed{k}") for k in range(2)])
    assert all(o.error is None and not o.pruned for o in outcomes)
    assert timings["total"] > timings["first_step"] > 0
    for k, config in enumerate(configs):
        final = train_and_evaluate(config, str(tmp_path / f"alone{k}"))
        records = assert_same_epoch_records(str(tmp_path / f"packed{k}"), str(tmp_path / f"alone{k}"), k)
        assert final["test/accuracy"] == pytest.approx(records[-1]["test/accuracy"], abs=1e-9)


@pytest.mark.slow
def test_packed_trials_on_different_validation_folds_equal_each_alone(tmp_path):
    """Trials that differ in data.fold (and seed) share one program, each training on its
    own fold's images and validating on its own fold, with the same mean/std normalization."""
    base = tiny_config()
    base.data.folds = 3
    base.normalization = "mean_std"
    configs = [resolve(apply_point(base, {"data.fold": j, "seed": j})) for j in (0, 2)]
    assert len({pack_key(c) for c in configs}) == 1
    packed = train_packed_and_alone(configs, tmp_path)
    splits = [json.loads((tmp_path / f"packed{k}" / "split.json").read_text()) for k in range(2)]
    assert [s["protocol"]["folds"] for s in splits] == [{"folds": 3, "fold": 0}, {"folds": 3, "fold": 2}]
    assert [(s["splits"]["train"]["count"], s["splits"]["val"]["count"]) for s in splits] == [(80, 40)] * 2
    assert not set(splits[0]["splits"]["val"]["files"]) & set(splits[1]["splits"]["val"]["files"])
    pre = [(tmp_path / f"packed{k}" / "preprocessing.json").read_text() for k in range(2)]
    assert pre[0] == pre[1] and "mean" in pre[0]  # the folds' images, so every fold alike
    assert packed[0][-1]["val/loss"] != packed[1][-1]["val/loss"]  # each its own validation images


def test_pack_key_ignores_exactly_the_traceable_fields():
    base = tiny_config()
    base.model.name = "stridednet"
    base.model.kwargs = {"widths": (8,), "dense_units": 16}
    key = pack_key(base)
    same = {"seed": 7, "optimizer.learning_rate": 0.5, "optimizer.adam.b1": 0.8, "optimizer.adam.eps": 1e-3,
            "model.kwargs.weight_decay": 1e-3, "progress": False, "model.kwargs.head_dropout": 0.1,
            **AUGMENT_SAME}
    for k, v in same.items():
        assert pack_key(apply_point(base, {k: v})) == key, k
    different = {"model.kwargs.widths": (16,), "optimizer.name": "sgd", "loss.label_smoothing": 0.1,
                 "num_epochs": 3, **AUGMENT_DIFFERENT}
    for k, v in different.items():
        assert pack_key(apply_point(base, {k: v})) != key, k
    # The decoupled weight-decay stage exists only for nonzero decay (adam, sgd): zero and
    # nonzero do not pack, two nonzero values do; adamw always has it.
    for name in ("adam", "sgd", "adamw"):
        opt = apply_point(base, {"optimizer.name": name})
        keys = [pack_key(apply_point(opt, {"optimizer.weight_decay": wd})) for wd in (0.0, 1e-4, 1e-3)]
        assert keys[1] == keys[2]
        assert (keys[0] == keys[1]) == (name == "adamw")


@pytest.mark.slow
def test_finished_resumed_and_fresh_trials_train_in_one_call(tmp_path, capsys):
    """A finished trial is re-evaluated (and says it is complete), a half-trained one resumes
    from its step, a fresh one starts: each ends with exactly the records of the same config
    trained straight through."""
    configs = [apply_point(tiny_config(), {"optimizer.learning_rate": lr}) for lr in (3e-3, 1e-3, 2e-3)]
    dirs = [str(tmp_path / f"t{k}") for k in range(3)]
    train_and_evaluate(configs[0], dirs[0])

    def stop_after_first_epoch(epoch, record):
        raise StopTraining

    train_and_evaluate(configs[1], dirs[1], on_epoch_end=stop_after_first_epoch)
    assert [r["epoch"] for r in epoch_records(dirs[1])] == [1]
    capsys.readouterr()
    outcomes, _ = train_trials(configs, dirs)
    assert all(o.error is None for o in outcomes)
    out = capsys.readouterr().out
    assert f"[0] {dirs[0]} is complete (2 epochs" in out and "nothing to train" in out
    assert f"{dirs[1]} is complete" not in out
    for k, config in enumerate(configs):
        train_and_evaluate(config, str(tmp_path / f"straight{k}"))
        assert_same_epoch_records(dirs[k], str(tmp_path / f"straight{k}"), k)
        assert outcomes[k].metrics["test/accuracy"] == pytest.approx(
            epoch_records(dirs[k])[-1]["test/accuracy"], abs=1e-9)


def test_a_non_finite_trial_stops_alone_and_the_pack_goes_on(tmp_path):
    configs = [apply_point(tiny_config(), {"optimizer.learning_rate": lr}) for lr in (3e-3, 1e30)]
    outcomes, _ = train_trials(configs, [str(tmp_path / "good"), str(tmp_path / "bad")])
    assert outcomes[0].error is None and [r["epoch"] for r in epoch_records(str(tmp_path / "good"))] == [1, 2]
    assert "Non-finite training loss at step" in str(outcomes[1].error)


SHARDED_WORKER = r'''
import json, sys
import jax
from cnnlab import sweep
from cnnlab.sweep.space import apply_point
from cnnlab.train import train_trials
from cnnlab.train.experiment import build_experiment, resolve
from cnnlab.train.packing import build_program

smoke, tiny, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = sweep.config_from_file(smoke)
exec(tiny, {"c": base})
configs = [resolve(apply_point(base, {"optimizer.learning_rate": lr})) for lr in (3e-3, 1e-3)]
states = build_program(build_experiment(configs[0]), configs).init()
leaf = jax.tree_util.tree_leaves(states.params)[0]
rows = sorted({s.data.shape[0] for s in leaf.addressable_shards})  # trials held per device
devices = sorted(d.id for d in leaf.sharding.device_set)
outcomes, _ = train_trials(configs, [f"{out}/t0", f"{out}/t1"])
assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
print(json.dumps({"devices": devices, "rows": rows}))
'''


@pytest.mark.slow
def test_packed_trials_shard_over_devices_and_match_one_device(tmp_path):
    """A pack of 2 trials on 2 (forced CPU) devices holds one trial per device, and each trial's
    metrics equal the same pack on one device."""
    runs = {}
    for n in (1, 2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        out = tmp_path / f"d{n}"
        proc = subprocess.run([sys.executable, "-c", SHARDED_WORKER, SMOKE, TINY, str(out)], env=env,
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        assert info == {"devices": list(range(n)), "rows": [2 // n]}, info
        runs[n] = out
    for t in ("t0", "t1"):
        one, two = epoch_records(str(runs[1] / t)), epoch_records(str(runs[2] / t))
        assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2]
        for a, b in zip(one, two):
            for key, value in a.items():
                expected = pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value
                assert b[key] == expected, (t, key)


def test_regularization_sweep_trains_as_one_pack():
    path = ROOT / "configs" / "sweeps" / "stridednet_regularization.py"
    base = sweep.config_from_file(str(path))
    sw = sweep.load_sweep_file(str(path))
    configs = [resolve(apply_point(base, p)) for p in sw.grid.points]
    assert len(configs) == sw.pack == 12
    assert len({pack_key(c) for c in configs}) == 1
    assert sorted(varying(configs)) == sorted({k for p in sw.grid.points for k in p})


def test_copy_config_is_an_unlocked_deep_copy():
    config = tiny_config()
    config.lock()
    copy = copy_config(config)
    copy.new_field = 1
    copy.optimizer.learning_rate = 0.5
    assert "new_field" not in config and config.optimizer.learning_rate != 0.5
