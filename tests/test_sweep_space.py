"""Sweep declarations: grid algebra, sampled spaces, validation errors before anything runs,
ranking on validation metrics, runnable config files, and the sweep files under configs/sweeps."""

import dataclasses
import pathlib

import pytest

from cnnlab import sweep
from cnnlab.schema import ConfigError
from cnnlab.sweep import space
from cnnlab.sweep.files import config_source, load_module, write_config_file
from cnnlab.train import validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def base_config():
    config = sweep.config_from_file(str(ROOT / "configs" / "smoke.py"))
    config.num_epochs = 2
    config.model.kwargs.widths = (8,)
    config.data.val_fraction = 0.1  # sweeps rank on val/ metrics by default
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


def test_a_point_leaving_alone_a_model_keyword_the_base_lacks_runs_its_default():
    # A chain whose points set different fields: a point that leaves `head_dropout` alone leaves
    # it unset, so the model's default applies (the base config does not set it), not None.
    grid = sweep.chain(sweep.point({"model.kwargs.head_dropout": 0.25}), sweep.point({"seed": 3}))
    sw, base = sweep.Sweep(grid=grid), base_config()
    assert "head_dropout" not in base.model.kwargs
    sweep.validate_sweep(sw, base)
    assert space.grid_values(sw, base, 0) == {"model.kwargs.head_dropout": 0.25, "seed": base.seed}
    assert space.grid_values(sw, base, 1) == {"seed": 3}
    assert "head_dropout" not in space.apply_point(base, space.grid_values(sw, base, 1)).model.kwargs
    # Optuna's params label it by the default it resolves to.
    assert space.grid_params(sw, base, 1) == {"model.kwargs.head_dropout": 0.5, "seed": 3}
    assert space.grid_choices(sw, base) == {"model.kwargs.head_dropout": [0.25, 0.5], "seed": [base.seed, 3]}
    # Each point is validated as its trial runs it, the fields it leaves alone included.
    bad = sweep.chain(sweep.point({"model.kwargs.head_dropout": 0.25}),
                      sweep.point({"model.kwargs.widths": (8,), "model.name": "resnet"}))
    with pytest.raises(ValueError, match=r"grid point 1.*head_dropout|grid point 1.*widths"):
        sweep.validate_sweep(sweep.Sweep(grid=bad), base)


@pytest.mark.parametrize("sw, match", [
    (sweep.Sweep(grid=sweep.product({"optimizer.learning_rat": [1e-3]})),
     r"grid point 0.*unknown config key 'optimizer.learning_rat' \(did you mean 'optimizer.learning_rate'"),
    (sweep.Sweep(grid=sweep.product({"optimzer.learning_rate": [1e-3]})),
     r"unknown config key 'optimzer' \(did you mean 'optimizer'"),
    (sweep.Sweep(grid=sweep.product({"seed.x": [1]})), r"config key 'seed' is not a group: cannot set 'seed.x'"),
    (sweep.Sweep(grid=sweep.chain(sweep.point({}), sweep.point({"optimizer.name": "adamx"}))),
     r"grid point 1 .*'optimizer.name': invalid value 'adamx'.*did you mean 'adam'"),
    (sweep.Sweep(grid=sweep.product({"model.kwargs.kernel_sizee": [3]})),
     r"unknown config key 'model.kwargs.kernel_sizee' \(did you mean 'model.kwargs.kernel_size'"),
    (sweep.Sweep(grid=sweep.product({"optimizer.learning_rate": [-1.0]})),
     r"'optimizer.learning_rate': invalid value -1.0 \(must be > 0\)"),
    (sweep.Sweep(grid=sweep.product({"num_epochs": ["ten"]})), r"'num_epochs': invalid value 'ten'"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), metric="test/acc"), r"Invalid Sweep\(metric='test/acc'\): must be one of val/loss"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), mode="maximize"), r"Invalid Sweep\(mode='maximize'\): must be one of max, min$"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), pruner="medain"), r"did you mean 'median'\?$"),
    (sweep.Sweep(space={"seed": sweep.integer(0, 3)}, sampler="grid"), r"sampler='grid' takes grid"),
    (sweep.Sweep(space={"seed": sweep.integer(0, 3)}), r"num_trials must be a positive integer"),
    (sweep.Sweep(space={"optimizer.learning_rate": sweep.loguniform(0.0, 1.0)}, num_trials=2),
     r"Log range for 'optimizer.learning_rate' needs low > 0"),
    (sweep.Sweep(space={"optimizer.learning_rate": sweep.uniform(1.0, 0.1)}, num_trials=2),
     r"low <= high"),
    (sweep.Sweep(space={"optimizer.learning_rate": [1e-3, 1e-4]}, num_trials=2),
     r"must be uniform\(\), loguniform\(\), integer\(\) or choice\(\)"),
    (sweep.Sweep(space={"model.name": sweep.choice(["simple_cnn", "nope"])}, num_trials=2),
     r"value for 'model.name'.*'model.name': invalid value 'nope'"),
    (sweep.Sweep(space={"optimizer.learning_rate": sweep.uniform(-1.0, 1.0)}, num_trials=2),
     r"value for 'optimizer.learning_rate'.*invalid value -1.0"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), pack=0), r"pack must be an integer >= 1"),
    (sweep.Sweep(grid=sweep.product({"seed": [0]}), folds=1), r"Invalid Sweep\(folds=1\): must be 0 \(off\) or an integer >= 2"),
    (sweep.Sweep(grid=sweep.product({"data.fold": [0, 1]}), folds=3), r"sets data.folds and data.fold itself; do not sweep them"),
    (sweep.Sweep(space={"data.fold": sweep.integer(0, 1)}, num_trials=2, folds=3), r"do not sweep them"),
    # With folds, a malformed grid or space is named as such (its fields cannot be read).
    (sweep.Sweep(space={"seed": sweep.integer(0, 3)}, sampler="grid", folds=3), r"sampler='grid' takes grid"),
    (sweep.Sweep(grid=None, space=None, sampler="random", folds=3), r"needs a non-empty space"),
])
def test_validation_rejects_bad_fields_and_values(sw, match):
    with pytest.raises(ValueError, match=match):
        sweep.validate_sweep(sw, base_config())


def test_sweeps_rank_on_validation_metrics_and_need_an_opt_in_for_test():
    grid = sweep.product({"seed": [0]})
    assert sweep.Sweep(grid=grid).metric == "val/accuracy"
    with pytest.raises(ValueError, match=r"metric='test/loss' selects trials on the test set.*"
                                         r"metric='val/loss'.*select_on_test=True"):
        sweep.validate_sweep(sweep.Sweep(grid=grid, metric="test/loss", mode="min"), base_config())
    opted_in = sweep.Sweep(grid=grid, metric="test/accuracy", select_on_test=True)
    with pytest.warns(UserWarning, match="test set is used for model selection"):
        sweep.validate_sweep(opted_in, base_config())
    assert opted_in.to_dict()["select_on_test"] and "select_on_test" not in sweep.Sweep(grid=grid).to_dict()
    no_val = space.apply_point(base_config(), {"data.val_fraction": 0.0, "checkpoint.best_metric": "train/loss",
                                               "checkpoint.best_mode": "min"})
    with pytest.raises(ValueError, match=r"needs a validation split: set data.val_fraction > 0"):
        sweep.validate_sweep(sweep.Sweep(grid=grid), no_val)
    sweep.validate_sweep(sweep.Sweep(grid=grid, folds=3), no_val)  # the folds validate
    assert sweep.Sweep(grid=grid, folds=3).to_dict()["folds"] == 3 and "folds" not in sweep.Sweep(grid=grid).to_dict()
    with pytest.raises(ValueError, match=r"the base config sets data.folds=4: remove it"):
        sweep.validate_sweep(sweep.Sweep(grid=grid, folds=3), space.apply_point(base_config(), {"data.folds": 4}))


def test_sweep_metrics_are_the_configs_registered_metrics_on_each_split(monkeypatch):
    from cnnlab._registry import Registry
    from cnnlab.train import metrics

    monkeypatch.setattr(metrics, "METRICS", Registry("metric", dict(metrics.METRICS.items())))
    metrics.register("top3_accuracy")(lambda logits, labels, mask: {"top3": mask.sum()})
    sw = sweep.Sweep(grid=sweep.product({"seed": [0]}), metric="val/top3_accuracy")
    with pytest.raises(ValueError, match=r"Invalid Sweep\(metric='val/top3_accuracy'\): must be one of"):
        sweep.validate_sweep(sw, base_config())  # registered, but not among the config's metrics
    config = base_config()
    config.metrics = (*config.metrics, "top3_accuracy")
    sweep.validate_sweep(sw, config)
    sweep.validate_sweep(dataclasses.replace(sw, metric="train/loss", mode="min"), config)


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
            "optimizer.adam.b1": sweep.uniform(0.8, 0.95, step=0.05),
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
        assert min(abs(d["optimizer.adam.b1"] - v) for v in (0.8, 0.85, 0.9, 0.95)) < 1e-9
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


def test_a_sweep_file_argument_reaches_get_sweep_as_ml_collections_passes_it_to_get_config(tmp_path):
    path = tmp_path / "sw.py"
    path.write_text(
        "from cnnlab import sweep\n"
        "from cnnlab.train import default_config\n"
        "def get_config(arg=None):\n    return default_config()\n"
        "def get_sweep(rates='0.1,0.2'):\n"
        "    return sweep.Sweep(grid=sweep.product({'optimizer.learning_rate': [float(r) for r in rates.split(',')]}),\n"
        "                       metric='val/accuracy')\n")
    assert sweep.load_sweep_file(str(path)).num_slots == 2
    assert sweep.load_sweep_file(f"{path}:0.1,0.2,0.3").num_slots == 3


def test_the_lever_sweep_runs_the_levers_named_after_the_colon():
    path = ROOT / "configs" / "sweeps" / "caltech101_folds_levers2.py"
    base = load_module(str(path)).get_config()
    both = sweep.load_sweep_file(f"{path}:random_resized_crop,rand_augment")
    sweep.validate_sweep(both, base)
    ops = [dict(p)["data.augment.ops"] for p in both.grid]
    assert [o[1] for o in ops] == ["random_resized_crop", "rand_augment"]
    assert sweep.load_sweep_file(str(path)).num_slots == 5
    with pytest.raises(ConfigError, match="unknown levers.*'rrc'.*choose from ema"):
        sweep.load_sweep_file(f"{path}:ema,rrc")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("*.py")))
def test_provided_sweep_files_validate_and_document_their_command(name):
    path = ROOT / "configs" / "sweeps" / f"{name}.py"
    module = load_module(str(path))
    assert f"cnnlab sweep --config=configs/sweeps/{name}.py" in module.__doc__
    sw = sweep.load_sweep_file(str(path))
    sweep.validate_sweep(sw, module.get_config())
    assert sw.num_slots >= 2  # a comparison, or a spread over seeds
    assert sw.metric.startswith("val/"), "sweeps rank on the validation split"
