"""``cnnlab export``: every built-in model of a tiny trained run to Keras (a functional model
where it branches) and to ONNX, predicting as ``run.predict`` does; the command line."""

import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from helpers import fast_only, tiny_config  # noqa: E402

from cnnlab import interop, load_run  # noqa: E402

# Each built-in model, tiny; resnet with projection shortcuts (a stage's first block changes
# the width, the second strides), the stem's max pooling, test-time flip and mean_std inputs.
MODELS = {
    "resnet": dict(stem_filters=8, stem_pool=True, stage_filters=(8, 16), stage_depths=(1, 1)),
    "resnet_basic": dict(stem_filters=8, stage_filters=(16, 16), stage_depths=(2, 1), bottleneck=False),
    "inception": dict(stem_filters=8, stage_widths=(8, 16)),
    "stridednet": dict(widths=(8,), stem_filters=4, dense_units=16),
    "simple_cnn": dict(widths=(8,), dense_units=16),
}
FLIP = {"resnet", "inception"}
MEAN_STD = {"inception", "resnet_basic"}
KERAS_ATOL, ONNX_ATOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(key)``: the run directory of ``MODELS[key]`` trained 1 epoch (once per module)."""
    import ml_collections

    from cnnlab.train import train_and_evaluate

    runs = {}

    def get(key):
        if key not in runs:
            config = tiny_config()
            config.num_epochs = 1
            config.model.name = key.split("_basic")[0]
            config.model.kwargs = ml_collections.ConfigDict(MODELS[key])
            config.eval_flip = key in FLIP
            if key in MEAN_STD:
                config.normalization = "mean_std"
            runs[key] = str(tmp_path_factory.mktemp(key) / "run")
            train_and_evaluate(config, runs[key])
        return runs[key]

    return get


def _images(run, n, seed=0):
    h, w = run.image_size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("key", fast_only(sorted(MODELS), "resnet"))
def test_every_builtin_model_exports_to_keras_predicting_as_the_run(key, trained, tmp_path):
    run_dir = trained(key)
    run = load_run(run_dir)
    assert bool(run.config.eval_flip) == (key in FLIP)
    out = tmp_path / "model.keras"
    interop.export_keras(run_dir, str(out))
    loaded = keras.saving.load_model(str(out))
    body = interop.trained_network(loaded)  # the trained network, nested in the export
    assert body.name == interop.EXPORT_BODY and body is not loaded
    if key.startswith("resnet"):
        assert "Add" in {type(layer).__name__ for layer in body.layers}
    images = _images(run, 5)
    expected = run.predict(images)
    assert not np.allclose(expected, expected[:1])  # the images are told apart
    got = loaded.predict(images, verbose=0)
    print(f"{key}: keras max |diff| {np.abs(got - expected).max():.3g}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=KERAS_ATOL)


def test_branched_models_export_as_functional_keras_models_with_their_merges():
    import jax

    from cnnlab import models

    for name, merge in (("resnet", "Add"), ("inception", "Concatenate")):
        model = models.get_model(name, num_classes=3, **MODELS[name])
        variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
        keras_model = interop.to_keras(model, variables, (16, 16, 3))
        assert not isinstance(keras_model, keras.Sequential)
        assert merge in {type(layer).__name__ for layer in keras_model.layers}


@pytest.mark.parametrize("key", fast_only(["resnet", "inception", "stridednet", "simple_cnn"],
                                           "resnet", "stridednet", "simple_cnn"))
def test_onnx_export_predicts_as_the_run(key, trained, tmp_path):
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    from cnnlab import onnx_export

    run_dir = trained(key)
    out = tmp_path / "model.onnx"
    onnx_export.export_onnx(run_dir, str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a dynamic batch
    run = load_run(run_dir)
    if MODELS[key].get("stem_pool"):
        # max pooling exports as one MaxPool, not as the strided slices cnnlab computes it by on CPU
        import onnx
        ops = {node.op_type for node in onnx.load(str(out)).graph.node}
        assert "MaxPool" in ops, sorted(ops)
    for n in (1, 3):
        images = _images(run, n, seed=n)
        expected = run.predict(images)
        got = session.run(None, {"images": images.astype(np.float32)})[0]
        print(f"{key}: onnx batch {n} max |diff| {np.abs(got - expected).max():.3g}")
        np.testing.assert_allclose(got, expected, rtol=0, atol=ONNX_ATOL)


def _cli(*args, code=None):
    return subprocess.run([sys.executable, *(["-c", code] if code else ["-m", "cnnlab"]), *args],
                          capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "jax"})


def test_cli_export_keras_and_onnx_and_its_errors(trained, tmp_path):
    run_dir = trained("simple_cnn")
    run = load_run(run_dir)
    images = _images(run, 3)
    expected = run.predict(images)

    out = tmp_path / "m.keras"
    proc = _cli("export", f"--workdir={run_dir}", "--format=keras", str(out))
    assert proc.returncode == 0 and f"Wrote {out}" in proc.stdout, proc.stderr[-3000:]
    np.testing.assert_allclose(keras.saving.load_model(str(out)).predict(images, verbose=0), expected,
                               rtol=0, atol=KERAS_ATOL)

    proc = _cli("export", f"--workdir={run_dir}", "--format=tflite", str(tmp_path / "m.tflite"))
    assert proc.returncode == 2 and "invalid choice: 'tflite' (choose from keras, onnx)" in proc.stderr.replace(
        "'keras', 'onnx'", "keras, onnx"), proc.stderr

    # Without the extra: exit code 2, one line saying what to install.
    hide = "import sys; sys.modules['jax2onnx'] = None; from cnnlab.cli import main; main(sys.argv)"
    proc = _cli("export", f"--workdir={run_dir}", "--format=onnx", str(tmp_path / "x.onnx"), code=hide)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        'cnnlab export: error: cnnlab export --format=onnx needs jax2onnx and onnxruntime: '
        'pip install "cnnlab[onnx]".']

    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="must end in .onnx"):
        interop.export_main([f"--workdir={run_dir}", "--format=onnx", str(tmp_path / "m.keras")])
    out = tmp_path / "m.onnx"
    proc = _cli("export", f"--workdir={run_dir}", "--format=onnx", str(out))
    assert proc.returncode == 0 and f"Wrote {out}" in proc.stdout, proc.stderr[-3000:]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.astype(np.float32)})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=ONNX_ATOL)
