"""The one config schema (cnnlab.schema): defaults, validation and its error format, the field
docs and ``cnnlab train --help``, command-line overrides of every field, and the data config."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import warnings

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import cnnlab.data as D
from cnnlab.schema import ConfigError, flatten
from cnnlab.train import default_config, validate_config
from cnnlab.train.config import config_help

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.py"


def smoke_config() -> ml_collections.ConfigDict:
    sys.path.insert(0, str(ROOT / "configs"))
    import smoke

    return smoke.get_config()


def with_value(config, key, value) -> ml_collections.ConfigDict:
    plain = config.to_dict()
    target = plain
    *parents, leaf = key.split(".")
    for p in parents:
        target = target[p]
    target[leaf] = value
    return ml_collections.ConfigDict(plain)


# --------------------------------------------------------------------------- error format


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optimizer.learning_rate", -1.0,
         "config key 'optimizer.learning_rate': invalid value -1.0 (must be > 0)"),
        ("optimzer", {"name": "adam"}, "unknown config key 'optimzer' (did you mean 'optimizer'?)"),
        ("optimizer.lerning_rate", 0.1,
         "unknown config key 'optimizer.lerning_rate' (did you mean 'optimizer.learning_rate'?)"),
        ("num_epoch", 3, "unknown config key 'num_epoch' (did you mean 'num_epochs'?)"),
        ("optimizer.name", "adamm", "config key 'optimizer.name': invalid value 'adamm' (must be one of"),
        ("model.name", "stridenet", "did you mean 'stridednet'?"),
        ("model.kwargs.widthz", (8,), "unknown config key 'model.kwargs.widthz' (did you mean 'model.kwargs.widths'?)"),
        ("model.kwargs.num_classes", 3, "config key 'model.kwargs.num_classes': invalid value 3 (set from the data"),
        ("schedule.name", "cosin", "did you mean 'cosine'?"),
        ("batch_size", 0, "config key 'batch_size': invalid value 0 (must be >= 1)"),
        ("batch_size", 3.5, "config key 'batch_size': invalid value 3.5 (must be int)"),
        ("progress", 1, "config key 'progress': invalid value 1 (must be bool)"),
        ("metrics", ("loss", "acuracy"), "config key 'metrics': invalid value 'acuracy' (must be one of"),
        ("data.split", "random", "config key 'data.split': invalid value 'random'"),
        ("data.augment.ops", ("keras_afine",), "did you mean 'keras_affine'?"),
        ("data.augment.keras_affine.fill_mode", "mirror", "'data.augment.keras_affine.fill_mode': invalid value 'mirror'"),
        ("data.augment.keras_affine.rotaton_range", 3.0, "did you mean 'data.augment.keras_affine.rotation_range'?"),
        ("data.augment.keras_affine.xyz", 1.0, "unknown config key 'data.augment.keras_affine.xyz' (valid keys here:"),
        # A field that moved into an op's group (the old flat augment keys) is found there.
        ("data.augment.horizontal_flip", True, "did you mean 'data.augment.keras_affine.horizontal_flip'?"),
        ("data.augment.mixup.alpha", 0.0, "'data.augment.mixup.alpha': invalid value 0.0 (must be > 0)"),
        ("schedule.warmup_epochs", 9.0, "invalid value 9.0 (must be <= num_epochs=4)"),
        ("checkpoint.best_metric", "val/acc", "did you mean 'val/accuracy'?"),
        ("data.folds", 1, "config key 'data.folds': invalid value 1 (must be 0 (off) or >= 2)"),
        ("data.fold", 2, "config key 'data.fold': invalid value 2 (needs folds >= 2"),
    ],
)
def test_one_error_format_names_the_key_the_value_and_the_closest_valid_one(key, value, message):
    with pytest.raises(ConfigError) as info:
        validate_config(with_value(smoke_config(), key, value))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_best_metric_is_a_validation_metric_unless_test_selection_is_asked_for():
    config = smoke_config()
    assert validate_config(config).checkpoint.best_metric == "val/accuracy"
    no_val = with_value(config, "data.val_fraction", 0.0)
    with pytest.raises(ConfigError, match=r"'checkpoint.best_metric'.*data.val_fraction is 0"):
        validate_config(no_val)
    validate_config(with_value(no_val, "data.folds", 5))  # k-fold validation is a validation split
    with pytest.raises(ConfigError, match=r"'data.fold': invalid value 5 \(must be < folds=5"):
        validate_config(with_value(with_value(no_val, "data.folds", 5), "data.fold", 5))
    on_test = with_value(no_val, "checkpoint.best_metric", "test/accuracy")
    with pytest.raises(ConfigError, match="checkpoint.select_on_test=True"):
        validate_config(on_test)
    with pytest.warns(UserWarning, match="test set is used for model selection"):
        validate_config(with_value(on_test, "checkpoint.select_on_test", True))
    for metric in ("train/loss", "val/top5_accuracy", "val/mean_per_class_accuracy"):
        validate_config(with_value(config, "checkpoint.best_metric", metric))
    # Only metrics the run computes.
    fewer = with_value(config, "metrics", ("loss", "accuracy"))
    with pytest.raises(ConfigError, match="'val/top5_accuracy'"):
        validate_config(with_value(fewer, "checkpoint.best_metric", "val/top5_accuracy"))


def test_registered_names_are_looked_up_at_validation_time():
    import jax.numpy as jnp

    from cnnlab.train import metrics

    config = with_value(smoke_config(), "metrics", ("accuracy", "schema_test_metric"))
    with pytest.raises(ConfigError, match="schema_test_metric"):
        validate_config(config)

    @metrics.register("schema_test_metric")
    def _always(logits, labels, mask):
        return {"schema_test": jnp.sum(mask)}

    config = with_value(config, "checkpoint.best_metric", "val/schema_test_metric")
    assert validate_config(config).metrics == ("accuracy", "schema_test_metric")


def test_default_config_validates_and_validation_is_idempotent():
    for config in (default_config(), smoke_config()):
        once = validate_config(config)
        assert validate_config(once).to_dict() == once.to_dict()
        listed = tuple(f"data.augment.{op}." for op in once.data.augment.ops)
        unlisted = {k for k in flatten(default_config())
                    if k.startswith("data.augment.") and k != "data.augment.ops" and not k.startswith(listed)}
        # so are the sections of the losses, optimizers and schedules not chosen
        for section in ("loss", "optimizer", "schedule"):
            chosen = f"{section}.{once[section].name}."
            unlisted |= {k for k in flatten(default_config()) if k.startswith(f"{section}.")
                         and k.count(".") == 2 and not k.startswith(chosen)}
        assert unlisted, "some ops are not listed in these configs"
        assert set(flatten(default_config())) - {"model.kwargs"} - unlisted <= set(flatten(once))
        assert not unlisted & set(flatten(once))  # only the listed ops' parameters are kept
    defaults = validate_config(default_config())
    assert defaults.data.val_fraction == 0.1 and defaults.checkpoint.best_metric == "val/accuracy"
    assert defaults.checkpoint.select_on_test is False and defaults.data.augment.ops == ()


def test_cli_rejects_a_typo_override_before_compute(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", f"--config={SMOKE}",
         f"--workdir={tmp_path}", "--config.optimizer.lerning_rate=0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- docs and --help


def test_every_field_is_documented_once():
    lines = config_help().split("\n\nmodel.kwargs for model.name=")[0].splitlines()
    documented = [line.split(" (", 1)[0] for line in lines]
    assert sorted(documented) == sorted(flatten(default_config()))
    assert "data.data_dir (str|None, None): " in config_help()
    assert all(line.split("): ", 1)[1] for line in lines)  # a doc on every line


def test_every_models_arguments_are_listed_with_type_default_and_doc():
    from cnnlab import models

    help_text = config_help()
    for name in models.MODELS.names():
        block = help_text.split(f"model.kwargs for model.name={name}:\n", 1)[1].split("\n\n", 1)[0]
        listed = [line.split(" (", 1)[0] for line in block.splitlines()]
        assert listed == [f"model.kwargs.{f}" for f in models.model_schema(name)], name
        assert all(line.split("): ", 1)[1] for line in block.splitlines()), name  # a doc each
    assert ("model.kwargs.widths (tuple, (32, 64, 128)): filters of each stage (two 3x3 convs, the "
            "second strided)") in help_text
    assert "model.kwargs.dropout (float, 0.25): dropout rate after each stage (traceable)" in help_text


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": 16}, "config key 'model.kwargs.widths': invalid value 16 (must be tuple)"),
    ({"dense_units": "many"}, "config key 'model.kwargs.dense_units': invalid value 'many' (must be int)"),
    ({"widht": (8,)}, "unknown config key 'model.kwargs.widht' (did you mean 'model.kwargs.widths'?)"),
    ({"dropout": True}, "config key 'model.kwargs.dropout': invalid value True (must be float)"),
])
def test_model_arguments_are_checked_by_their_fields(kwargs, message):
    from cnnlab.train import validate_config

    c = default_config()
    c.model.name = "stridednet"
    c.model.kwargs = kwargs
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    assert str(e.value) == message
    c.model.kwargs = {"widths": [8, 16], "dropout": 0}  # a list is a tuple, an int a float
    assert validate_config(c).model.kwargs.to_dict() == {"widths": (8, 16), "dropout": 0.0}


def test_a_bad_model_argument_is_refused_before_anything_is_written(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}",
         "--config.model.kwargs.widths=16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "config key 'model.kwargs.widths': invalid value 16 (must be tuple)" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_train_help_prints_the_flags_and_every_field(tmp_path):
    # The config file's own registrations (here an augmentation op) are listed too.
    (tmp_path / "help_op.py").write_text(
        "from cnnlab.data import register_augment\nfrom cnnlab.schema import Field\n"
        "register_augment('help_op', amount=Field(0.5, float, doc='how much'))(lambda *a, **k: a[1:])\n")
    (tmp_path / "config.py").write_text(
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport help_op  # noqa\n"
        f"exec(open({str(SMOKE)!r}).read())\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", f"--config={tmp_path / 'config.py'}",
         "--config.data.data_dir=/tmp/x", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for needle in ("--allow_config_change", "--workdir", "--num_processes",
                   "data.augment.keras_affine.rotation_range (float, 0.0): rotation",
                   "checkpoint.best_metric (str, 'val/accuracy')", "optimizer.learning_rate",
                   "data.augment.help_op.amount (float, 0.5): how much"):
        assert needle in proc.stdout


# --------------------------------------------------------------------------- command line


def _parse(*args: str) -> ml_collections.ConfigDict:
    argv = ["prog", f"--config={SMOKE}", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)  # as cnnlab train defines it
    values(argv)
    return values.config


def _another(value):
    if value is None:
        return "/tmp/x", "/tmp/x"
    if isinstance(value, bool):
        return str(not value).lower(), not value
    if isinstance(value, (int, float)):
        return str(value + 1), value + 1
    if isinstance(value, tuple):
        return "('a', 'b')", ("a", "b")
    return "other", "other"


def test_every_field_can_be_set_from_the_command_line():
    defaults = {k: v for k, v in flatten(smoke_config()).items() if not k.startswith("model.kwargs")}
    wanted = {k: _another(v) for k, v in defaults.items()}
    parsed = flatten(_parse(*(f"--config.{k}={text}" for k, (text, _) in wanted.items())))
    assert {k: parsed[k] for k in wanted} == {k: v for k, (_, v) in wanted.items()}


def test_command_line_overrides_validate():
    config = _parse("--config.data.data_dir=/tmp/x", "--config.data.cache_dir=/tmp/c",
                    "--config.data.augment.keras_affine.rotation_range=10",
                    "--config.data.augment.ops=('keras_affine','random_crop')",
                    "--config.metrics=('loss','accuracy')")
    resolved = validate_config(config)
    assert resolved.data.data_dir == "/tmp/x" and resolved.data.cache_dir == "/tmp/c"
    assert resolved.data.augment.keras_affine.rotation_range == 10.0
    assert resolved.data.augment.ops == ("keras_affine", "random_crop")
    assert resolved.metrics == ("loss", "accuracy")


# --------------------------------------------------------------------------- data config


def test_data_config_has_every_field_and_validates():
    cfg = D.default_data_config()
    resolved = D.resolve_config(cfg)
    assert set(cfg.to_dict()) == set(resolved)
    assert resolved["classes"] == "tutorial4"
    assert resolved["split"] == "stratified" and resolved["test_fraction"] == 0.25
    assert resolved["val_fraction"] == 0.1
    assert resolved["image_size"] == 96 and resolved["resize"] == "stretch"
    assert resolved["data_dir"] is None and D.resolve_config({"data_dir": ""})["data_dir"] is None
    assert D.resolve_config({"classes": "Faces, Leopards"})["classes"] == ("Faces", "Leopards")
    assert D.resolve_config({"classes": ["a", "b"]})["classes"] == ("a", "b")
    assert D.resolve_config({"image_size": [32, 48]})["image_size"] == (32, 48)


@pytest.mark.parametrize(
    "field,value",
    [
        ("source", "imagenet"),
        ("split", "random"),
        ("resize", "squash"),
        ("test_fraction", 1.5),
        ("test_fraction", 0.0),
        ("val_fraction", -0.1),
        ("image_size", 0),
        ("image_size", (32,)),
        ("max_per_class", -1),
        ("num_workers", -2),
        ("classes", ""),
        ("classes", 3),
        ("drop_background", "yes"),
        ("cache_verify", "none"),
        ("synthetic_num_classes", 65),
        ("pad_value", 256),
    ],
)
def test_bad_data_values_raise_naming_the_key(field, value):
    with pytest.raises(ConfigError, match=rf"config key 'data.{field}': invalid value"):
        D.resolve_config({field: value})


def test_unknown_data_fields_raise():
    with pytest.raises(ConfigError, match="unknown config key 'data.colour_jitter'"):
        D.resolve_config({"colour_jitter": 0.3})
    with pytest.raises(ConfigError, match="unknown config key 'data.augment.brightness'"):
        D.resolve_config({"augment": {"brightness": 0.3}})
    with pytest.raises(ConfigError, match="data.augment.keras_affine.fill_mode"):
        D.resolve_config({"augment": {"keras_affine": {"fill_mode": "mirror"}}})


def test_augment_forms_that_keras_accepts():
    ok = {"width_shift_range": [-2, 2], "height_shift_range": 3, "zoom_range": [0.8, 1.2]}
    got = D.resolve_config({"augment": {"ops": ["keras_affine"], "keras_affine": ok}})["augment"]["keras_affine"]
    assert got["width_shift_range"] == (-2, 2) and got["height_shift_range"] == 3
    assert got["zoom_range"] == (0.8, 1.2)
    for bad in ({"zoom_range": [1.2, 0.8]}, {"zoom_range": 1.5}, {"width_shift_range": -0.1},
                {"width_shift_range": []}):
        with pytest.raises(ConfigError, match=f"data.augment.keras_affine.{next(iter(bad))}"):
            D.resolve_config({"augment": {"keras_affine": bad}})


def test_parameters_of_an_op_that_is_not_listed_warn_and_are_not_kept():
    with pytest.warns(UserWarning, match=r"data.augment.mixup.alpha set, but 'mixup' is not in data.augment.ops"):
        got = D.resolve_config({"augment": {"ops": ["keras_affine"], "mixup": {"alpha": 0.5}}})
    assert set(got["augment"]) == {"ops", "keras_affine"}
    with pytest.raises(ConfigError, match="data.augment.mixup.alpha"):  # still validated
        D.resolve_config({"augment": {"mixup": {"alpha": -1.0}}})


def test_warnings_are_not_issued_for_default_selection():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(default_config())


def test_fields_declared_without_effect_are_what_resume_packing_and_sweeps_ignore(tmp_path):
    """``Field.affects_results`` is the one source: the resume check, the pack key and the sweep
    fingerprint all ignore exactly the fields declared without effect."""
    from cnnlab import sweep
    from cnnlab.schema import keys_without_effect
    from cnnlab.sweep import space
    from cnnlab.train import pack_key
    from cnnlab.train.config import train_schema
    from cnnlab.train.rundir import ConfigChangedError, record_config

    without = set(keys_without_effect(train_schema()))
    assert without == {"progress", "log_every_steps", "data.data_dir", "data.cache_dir",
                       "data.use_cache", "data.cache_verify", "data.num_workers"}
    base = default_config()
    study = sweep.Sweep(space={"optimizer.learning_rate": sweep.loguniform(1e-4, 1e-2)}, metric="val/accuracy")
    for key, value in (("progress", False), ("log_every_steps", 3), ("data.num_workers", 0),
                       ("data.data_dir", str(tmp_path)), ("seed", 5), ("optimizer.learning_rate", 0.5)):
        changed = default_config()
        node, name = changed, key.split(".")
        for part in name[:-1]:
            node = node[part]
        node[name[-1]] = value
        workdir = tmp_path / key
        workdir.mkdir()
        record_config(workdir, validate_config(base), step=0)
        ignored = key in without
        if ignored:
            record_config(workdir, validate_config(changed), step=5)
        else:
            with pytest.raises(ConfigChangedError, match=key):
                record_config(workdir, validate_config(changed), step=5)
        # seed and traceable fields pack; a field without effect packs too
        assert (pack_key(changed) == pack_key(base)) == (ignored or key in ("seed", "optimizer.learning_rate"))
        assert (space.fingerprint(changed, study) == space.fingerprint(base, study)) == ignored
