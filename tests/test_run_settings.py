"""Settings that environment variables used to hold, now config fields: ``conv_formulation``
and ``image_data_format`` (the variables override them), recorded in the run and checked on
resume; a model computes the same in either data format from the same variables."""

import json

import jax
import numpy as np
import pytest
from helpers import epoch_records, fast_only, tiny_config

from cnnlab.native import conv_impl
from cnnlab.schema import ConfigError
from cnnlab.train import default_config, train_and_evaluate, validate_config
from cnnlab.train.experiment import build_model, resolve
from cnnlab.train.rundir import ConfigChangedError


@pytest.mark.parametrize("name", fast_only(["stridednet", "resnet", "inception", "simple_cnn"], "resnet", "simple_cnn"))
def test_channels_first_computes_what_channels_last_does_from_the_same_variables(name):
    config = default_config()
    config.model.name = name
    config = validate_config(config)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 40, 40, 3))
    last = build_model(config, 5)
    variables = last.init(jax.random.PRNGKey(0), x, training=False)
    config.image_data_format = "channels_first"
    first = build_model(config, 5)
    assert type(first).__name__ == type(last).__name__
    init_first = first.init(jax.random.PRNGKey(0), x, training=False)
    assert jax.tree_util.tree_map(np.shape, init_first) == jax.tree_util.tree_map(np.shape, variables)
    np.testing.assert_allclose(first.apply(variables, x, training=False),
                               last.apply(variables, x, training=False), rtol=1e-5, atol=1e-5)


def test_environment_variables_override_the_fields_and_bad_values_name_the_key(monkeypatch):
    monkeypatch.delenv(conv_impl.FORMULATION_ENV, raising=False)
    monkeypatch.delenv("CNNLAB_IMAGE_DATA_FORMAT", raising=False)
    config = tiny_config()
    config.conv_formulation = "xla"
    resolved = resolve(config)
    assert (resolved.conv_formulation, resolved.image_data_format) == ("xla", "channels_last")
    monkeypatch.setenv(conv_impl.FORMULATION_ENV, "phase/xla")
    monkeypatch.setenv("CNNLAB_IMAGE_DATA_FORMAT", "channels_first")
    resolved = resolve(config)
    assert (resolved.conv_formulation, resolved.image_data_format) == ("phase/xla", "channels_first")
    monkeypatch.setenv("CNNLAB_IMAGE_DATA_FORMAT", "nchw")
    with pytest.raises(ConfigError, match=r"'image_data_format \(from \$CNNLAB_IMAGE_DATA_FORMAT\)': invalid value 'nchw'"):
        resolve(config)
    config.conv_formulation = "fastest"
    with pytest.raises(ConfigError, match=r"'conv_formulation': invalid value 'fastest' \(expected auto, xla"):
        validate_config(config)


def test_the_formulation_scope_is_what_convolutions_see_unless_the_variable_overrides(monkeypatch):
    monkeypatch.delenv(conv_impl.FORMULATION_ENV, raising=False)
    assert conv_impl.forced_formulations() is None
    with conv_impl.formulation("xla"):
        assert conv_impl.forced_formulations() == ("xla", "xla", "xla")
        monkeypatch.setenv(conv_impl.FORMULATION_ENV, "auto")
        assert conv_impl.forced_formulations() is None
    assert conv_impl.formulation_setting() == "auto"


def test_a_run_records_the_settings_and_a_resume_under_others_is_a_config_change(tmp_path, monkeypatch):
    monkeypatch.delenv("CNNLAB_IMAGE_DATA_FORMAT", raising=False)
    config = tiny_config()
    config.num_epochs = 1
    config.image_data_format = "channels_first"
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    with open(f"{workdir}/config.json") as f:
        recorded = json.load(f)
    assert recorded["image_data_format"] == "channels_first"
    assert recorded["conv_formulation"] == "xla"  # tests run under CNNLAB_CONV_FORMULATION=xla
    assert len(epoch_records(workdir)) == 1
    monkeypatch.setenv("CNNLAB_IMAGE_DATA_FORMAT", "channels_last")
    with pytest.raises(ConfigChangedError, match=r'\(1 key\(s\)\): image_data_format: "channels_first" -> "channels_last"'):
        train_and_evaluate(config, workdir)
