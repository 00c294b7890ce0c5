"""Sweep declarations: grid algebra, sampled spaces, validation errors before anything runs,
runnable config files, pack keys, and the sweep files under configs/sweeps."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnlab import models, nn, sweep
from cnnlab.data.transforms import TUTORIAL_AUGMENT
from cnnlab.sweep import space
from cnnlab.sweep.files import config_source, load_module, write_config_file
from cnnlab.train import group as packed
from cnnlab.train import validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def base_config():
    config = sweep.config_from_file(str(ROOT / "configs" / "smoke.py"))
    config.num_epochs = 2
    config.model.kwargs.widths = (8,)
    return config


# --- grids -----------------------------------------------------------------------------------


def test_product_zip_chain_and_point():
    g = sweep.product({"optimizer.learning_rate": [1e-3, 1e-4]}, {"seed": [0, 1, 2]})
    assert len(g) == 6
    assert g.points[0] == {"optimizer.learning_rate": 1e-3, "seed": 0}
    assert g.points[-1] == {"optimizer.learning_rate": 1e-4, "seed": 2}

    z = sweep.zip({"model.kwargs.kernel_size": [3, 5], "model.kwargs.padding": ["same", "valid"]})
    assert z.points == ({"model.kwargs.kernel_size": 3, "model.kwargs.padding": "same"},
                        {"model.kwargs.kernel_size": 5, "model.kwargs.padding": "valid"})
    c = sweep.chain(sweep.point({}), z, {"model.kwargs.widths": [(8,), (16,)]})
    assert len(c) == 5 and c.points[0] == {} and c.points[-1] == {"model.kwargs.widths": (16,)}
    nested = sweep.product(c, {"seed": [0, 1]})
    assert len(nested) == 10
    s = sweep.Sweep(grid=nested)
    assert s.kind == "grid" and s.num_slots == 10
    assert s.fields()[-1] == "seed"


@pytest.mark.parametrize("build, match", [
    (lambda: sweep.product({"seed": 0}), "must be a list"),
    (lambda: sweep.product({"seed": []}), "empty list"),
    (lambda: sweep.zip({"seed": [0, 1], "num_epochs": [1]}), "one length"),
    (lambda: sweep.product({"seed": [0]}, {"seed": [1]}), "set twice"),
    (lambda: sweep.product({"": [1]}), "dotted config path"),
])
def test_grid_construction_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("sw, match", [
    (sweep.Sweep(grid=sweep.product({"optimizer.learning_rat": [1e-3]})),
     r"grid point 0.*Unknown config field 'optimizer.learning_rat'.*Did you mean \"learning_rate\""),
    (sweep.Sweep(grid=sweep.product({"optimzer.learning_rate": [1e-3]})),
     r"'optimzer' is not a group.*Did you mean \"optimizer\""),
    (sweep.Sweep(grid=sweep.chain(sweep.point({}), sweep.point({"optimizer.name": "adamx"}))),
     r"grid point 1 .*optimizer.name='adamx'"),
    (sweep.Sweep(grid=sweep.product({"model.kwargs.kernel_sizee": [3]})),
     r"model.kwargs.kernel_sizee.*simple_cnn"),
    (sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [-1.0]})),
     r"learning_rate must be positive"),
    (sweep.Sweep(grid=sweep.product({"num_epochs": ["ten"]})), r"num_epochs.*type int"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), metric="test/acc"), r"Invalid metric='test/acc'"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), mode="maximize"), r"Invalid mode"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), pruner="medain"), r'Did you mean "median"'),
    (sweep.Sweep(space={"seed": sweep.integer(0, 3)}, sampler="grid"), r"sampler='grid' takes grid"),
    (sweep.Sweep(space={"seed": sweep.integer(0, 3)}), r"num_trials must be a positive integer"),
    (sweep.Sweep(space={"optimizer.learning_rate": sweep.loguniform(0.0, 1.0)}, num_trials=2),
     r"Log range for 'optimizer.learning_rate' needs low > 0"),
    (sweep.Sweep(space={"optimizer.learning_rate": sweep.uniform(1.0, 0.1)}, num_trials=2),
     r"low <= high"),
    (sweep.Sweep(space={"optimizer.learning_rate": [1e-3, 1e-4]}, num_trials=2),
     r"must be uniform\(\), loguniform\(\), integer\(\) or choice\(\)"),
    (sweep.Sweep(space={"model.name": sweep.choice(["simple_cnn", "nope"])}, num_trials=2),
     r"value for 'model.name'.*Invalid model.name='nope'"),
    (sweep.Sweep(space={"optimizer.learning_rate": sweep.uniform(-1.0, 1.0)}, num_trials=2),
     r"learning_rate must be positive"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), pack=0), r"pack must be an integer >= 1"),
])
def test_validation_rejects_bad_fields_and_values(sw, match):
    with pytest.raises(ValueError, match=match):
        sweep.validate_sweep(sw, base_config())


def test_run_sweep_rejects_before_anything_runs(tmp_path):
    bad = sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [1e-3, 0.0]}))
    with pytest.raises(ValueError, match=r"grid point 1"):
        sweep.run_sweep(base_config(), bad, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_group_values_replace_the_group():
    config = space.apply_point(base_config(), {"model": {"name": "stridednet", "kwargs": {"widths": [8, 16]}}})
    assert config.model.name == "stridednet" and dict(config.model.kwargs) == {"widths": (8, 16)}
    validate_config(config)


# --- sampled spaces ------------------------------------------------------------------------------


def test_random_draws_depend_only_on_seed_and_index():
    sw = sweep.Sweep(
        space={
            "optimizer.learning_rate": sweep.loguniform(1e-4, 1e-2),
            "optimizer.b1": sweep.uniform(0.8, 0.95, step=0.05),
            "num_epochs": sweep.integer(1, 9, step=2),
            "model.kwargs.widths": sweep.choice([(8,), (8, 16)]),
        },
        sampler="random", num_trials=20, seed=3,
    )
    sweep.validate_sweep(sw, base_config())
    draws = [space.sample_random(sw, i) for i in range(20)]
    assert draws == [space.sample_random(sw, i) for i in range(20)]
    assert draws != [space.sample_random(dataclasses.replace(sw, seed=4), i) for i in range(20)]
    for d in draws:
        assert 1e-4 <= d["optimizer.learning_rate"] <= 1e-2
        assert min(abs(d["optimizer.b1"] - v) for v in (0.8, 0.85, 0.9, 0.95)) < 1e-9
        assert d["num_epochs"] in (1, 3, 5, 7, 9)
        assert d["model.kwargs.widths"] in ("[8]", "[8, 16]")  # categorical labels
    assert len({d["model.kwargs.widths"] for d in draws}) == 2


# --- files -------------------------------------------------------------------------------------


def test_written_config_file_rebuilds_the_config(tmp_path):
    config = space.apply_point(base_config(), {"model.kwargs.widths": (8, 16), "optimizer.learning_rate": 0.1 + 0.2})
    path = tmp_path / "cfg.py"
    write_config_file(config, str(path), docstring="A test.\n\n    cnnlab train --config=cfg.py")
    text = path.read_text()
    assert "config.model.kwargs['widths'] = (8, 16)" in text
    again = load_module(str(path)).get_config()
    assert validate_config(again).to_dict() == validate_config(config).to_dict()
    assert config_source(again, docstring="x") == config_source(config, docstring="x")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("*.py")))
def test_provided_sweep_files_validate_and_document_their_command(name):
    path = ROOT / "configs" / "sweeps" / f"{name}.py"
    module = load_module(str(path))
    assert f"cnnlab sweep --config=configs/sweeps/{name}.py" in module.__doc__
    sw = sweep.load_sweep_file(str(path))
    sweep.validate_sweep(sw, module.get_config())
    assert sw.num_slots >= 4


# --- packing -----------------------------------------------------------------------------------


def test_pack_key_ignores_exactly_the_packable_fields():
    base = base_config()
    key = packed.pack_key(base)
    same = {"seed": 7, "optimizer.learning_rate": 0.5, "optimizer.b1": 0.8, "optimizer.eps": 1e-3,
            "model.kwargs.weight_decay": 1e-3, "progress": False, "model.kwargs.head_dropout": 0.1,
            "data.augment.zoom_range": 0.1, "data.augment.rotation_range": 10.0,
            "data.augment.width_shift_range": 3.0, "data.augment.height_shift_range": 0.2,
            "data.augment.shear_range": 5.0}
    for k, v in same.items():
        assert packed.pack_key(space.apply_point(base, {k: v})) == key, k
    # Structure: which mixing is on, flips, fill modes, crops.
    different = {"model.kwargs.widths": (16,), "optimizer.name": "sgd", "loss.label_smoothing": 0.1,
                 "num_epochs": 3, "data.augment.mixup_alpha": 0.2, "data.augment.cutmix_alpha": 1.0,
                 "data.augment.vertical_flip": True,
                 "data.augment.fill_mode": "reflect", "data.augment.random_crop_padding": 2}
    for k, v in different.items():
        assert packed.pack_key(space.apply_point(base, {k: v})) != key, k
    mixing = space.apply_point(base, {"data.augment.mixup_alpha": 0.2})
    assert packed.pack_key(space.apply_point(mixing, {"data.augment.mixup_alpha": 0.4})) == packed.pack_key(mixing)
    # The tutorial preset and the same values given one by one are one program.
    preset = space.apply_point(base, {"data.augment.preset": "tutorial"})
    spelled = space.apply_point(base, {f"data.augment.{k}": v for k, v in TUTORIAL_AUGMENT.items()})
    assert packed.pack_key(preset) == packed.pack_key(spelled)
    # A dropout rate outside [0, 1] is named (the engine then runs that trial alone, where it fails).
    with pytest.raises(ValueError, match=r"model.kwargs.head_dropout=1.5"):
        packed.pack_key(space.apply_point(base, {"model.kwargs.head_dropout": 1.5}))
    # make_optimizer's decay stage exists only for nonzero decay (adam, sgd, rmsprop): zero and
    # nonzero do not pack, two nonzero values do; adamw always has it.
    for name in ("adam", "sgd", "adamw"):
        opt = space.apply_point(base, {"optimizer.name": name})
        keys = [packed.pack_key(space.apply_point(opt, {"optimizer.weight_decay": wd})) for wd in (0.0, 1e-4, 1e-3)]
        assert keys[1] == keys[2]
        assert (keys[0] == keys[1]) == (name == "adamw")


def test_l2_scaling_is_linear_for_simple_cnn():
    def model_for(wd):
        return models.get_model("simple_cnn", num_classes=4, widths=(4,), dense_units=8, weight_decay=wd)

    packed.check_linear_penalties(model_for, (16, 16, 3), [0.0, 1e-4, 5e-4, 2.0])


@pytest.mark.slow
@pytest.mark.parametrize("name", packed.LINEAR_L2_MODELS)
def test_l2_scaling_is_linear_for_every_packable_model(name):
    packed.check_linear_penalties(
        lambda wd: models.get_model(name, num_classes=4, weight_decay=wd), (32, 32, 3), [0.0, 1e-4, 1e-3])



def test_regularization_sweep_trains_as_one_pack():
    path = ROOT / "configs" / "sweeps" / "stridednet_regularization.py"
    base = load_module(str(path)).get_config()
    sw = sweep.load_sweep_file(str(path))
    configs = [space.apply_point(base, p) for p in sw.grid.points]
    assert len(configs) == sw.pack == 12
    assert len({packed.pack_key(c) for c in configs}) == 1
    assert sorted(packed._varying(configs)) == sorted(
        ["model/dropout", "model/head_dropout"]
        + [f"augment/{k}" for k in ("rotation_range", "zoom_range", "width_shift_range", "height_shift_range",
                                    "shear_range")])


def _dropout_outputs(name, rates, image_size=32):
    """The model's training-mode logits under ``rates`` given as Python floats and as traced
    scalars, and under other traced rates."""
    x = jax.random.uniform(jax.random.key(0), (2, image_size, image_size, 3))
    rngs = {"dropout": jax.random.key(1)}
    model = models.get_model(name, num_classes=4, **rates)
    variables = model.init({"params": jax.random.key(0)}, x, training=False)

    def run(r):
        logits, _ = models.get_model(name, num_classes=4, **r).apply(
            variables, x, training=True, rngs=rngs, mutable=["batch_stats", nn.LOSSES])
        return logits

    want = jax.jit(lambda: run(rates))()
    got = jax.jit(run)({f: jnp.float32(v) for f, v in rates.items()})
    other = jax.jit(run)({f: jnp.float32(v / 2) for f, v in rates.items()})
    return np.asarray(want), np.asarray(got), np.asarray(other)


@pytest.mark.parametrize("name", ["simple_cnn", "stridednet"])
def test_dropout_fields_take_traced_rates(name):
    rates = {f: 0.3 + 0.2 * i for i, f in enumerate(packed.DROPOUT_FIELDS[name])}
    want, got, other = _dropout_outputs(name, rates)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(other, want)  # the field really is a rate the model uses


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(packed.DROPOUT_FIELDS))
def test_dropout_fields_of_every_packable_model_take_traced_rates(name):
    rates = {f: 0.5 for f in packed.DROPOUT_FIELDS[name]}
    want, got, other = _dropout_outputs(name, rates)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(other, want)
