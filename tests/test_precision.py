"""mixed_precision: ``"auto"`` takes bfloat16 exactly where the hardware computes it natively
(and an ISA limit hides it), records the choice in the run; True on a CPU without native
bfloat16 says so and runs; the config field takes True, False, "auto" from files and flags."""

import json
import os
import subprocess
import sys

import pytest
from helpers import SMOKE, tiny_config

from cnnlab import _notices
from cnnlab.native import conv_impl, onednn
from cnnlab.schema import ConfigError
from cnnlab.train import default_config, experiment, train_and_evaluate


@pytest.mark.parametrize("flags, environ, native, words", [
    ({"avx2", "fma"}, {}, False, "no native bfloat16"),
    ({"avx512f", "avx512_bf16"}, {}, True, "avx512_bf16"),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, {}, True, "amx_bf16 and avx512_bf16"),
    ({"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "avx2"}, False, "ONEDNN_MAX_CPU_ISA=AVX2"),
    ({"avx512_bf16"}, {"DNNL_MAX_CPU_ISA": "AVX512_CORE"}, False, "ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
    ({"amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True, "amx_bf16"),
    ({"amx_bf16"}, {"XLA_FLAGS": "--foo --xla_cpu_max_isa=AVX2"}, False, "--xla_cpu_max_isa=AVX2"),
])
def test_native_bfloat16_reads_the_cpu_flags_and_the_isa_limits(flags, environ, native, words):
    got, why = onednn.native_bfloat16(flags, environ, probe=False)
    assert got is native and words in why


def test_the_field_takes_booleans_words_and_auto_from_files_and_flags():
    c = default_config()
    assert c.mixed_precision is False
    for value, want in ((True, True), ("auto", "auto"), ("False", False), ("bfloat16", True),
                        ("float32", False), (False, False)):
        c.mixed_precision = value  # a config file may assign any of them
        assert experiment.validate_config(c).mixed_precision == want
    c.mixed_precision = "fast"
    with pytest.raises(ConfigError, match="'mixed_precision': invalid value 'fast'.*True, False or 'auto'"):
        experiment.validate_config(c)


@pytest.mark.parametrize("native", [True, False])
def test_auto_decides_by_the_hardware_and_the_run_records_it(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(conv_impl, "native_bfloat16", lambda: (native, "test says so"))
    monkeypatch.setattr(_notices, "_said", {})
    c = tiny_config()
    c.mixed_precision = "auto"
    r = experiment.resolve(c)
    assert r.mixed_precision is native
    assert f"mixed_precision=auto: {'bfloat16' if native else 'float32'} (test says so)" in capsys.readouterr().err
    c.num_epochs = 1
    train_and_evaluate(c, str(tmp_path / "run"))
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["mixed_precision"] is native
    with open(tmp_path / "run" / "environment.json") as f:
        assert json.load(f)["native_bfloat16"] == f"{'yes' if native else 'no'}: test says so"
    # a rerun with "auto" on the same machine is the same config (not refused as a change)
    train_and_evaluate(c, str(tmp_path / "run"))


def test_true_without_native_bfloat16_says_so_once_and_runs(monkeypatch, capsys):
    monkeypatch.setattr(conv_impl, "native_bfloat16", lambda: (False, "no bf16 here"))
    monkeypatch.setattr(_notices, "_said", {})
    c = tiny_config()
    c.mixed_precision = True
    for _ in range(3):
        assert experiment.resolve(c).mixed_precision is True
    err = capsys.readouterr().err
    assert err.count("mixed_precision=True on a CPU without native bfloat16 (no bf16 here)") == 1


@pytest.mark.slow
def test_auto_from_the_command_line(tmp_path):
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", conv_impl.FORMULATION_ENV: "auto"}
    run = subprocess.run(
        [sys.executable, "-m", "cnnlab.cli", "train", f"--config={SMOKE}", f"--workdir={tmp_path}/run",
         "--config.mixed_precision=auto", "--config.num_epochs=1", "--config.data.image_size=16",
         "--config.data.synthetic_per_class=20", "--config.progress=False"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mixed_precision=auto: float32 (" in run.stderr
    if onednn.available():  # else: oneDNN is unavailable, which the line says instead
        assert "ONEDNN_MAX_CPU_ISA=AVX2 hides the CPU's bfloat16" in run.stderr or \
            "no native bfloat16" in run.stderr
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["mixed_precision"] is False


@pytest.mark.slow
def test_caltech101_config_trains_under_avx2_limits():
    # The flagship config's first steps on an emulated AVX2-only CPU (oneDNN and XLA limited),
    # with bfloat16 forced: it used to crash at its first step (oneDNN refusing bfloat16).
    data = os.environ.get("CALTECH101_DIR")
    if not data or not os.path.isdir(data):
        pytest.skip("CALTECH101_DIR is not set to the CALTECH-101 folder")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", conv_impl.FORMULATION_ENV: "auto",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [sys.executable, "-m", "cnnlab.cli", "train", f"--config={root}/configs/caltech101.py",
             f"--workdir={tmp}/run", "--config.num_epochs=1", "--config.schedule.warmup_epochs=0",
             "--config.mixed_precision=True", "--config.data.classes=tutorial4", "--config.progress=False"],
            env=env, capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "mixed_precision=True on a CPU without native bfloat16" in run.stderr
        with open(f"{tmp}/run/config.json") as f:
            assert json.load(f)["mixed_precision"] is True
        with open(f"{tmp}/run/conv_formulations.json") as f:
            assert any('"bfloat16"' in key for key in json.load(f))
