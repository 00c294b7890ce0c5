"""cnnlab.load_run / Run.predict / cnnlab predict: a run directory alone classifies images as
the trainer evaluates them (the data folder is deleted before any prediction)."""

import ast
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image

import cnnlab
from cnnlab.data import testing
from cnnlab.inference import predict_main, prepare_images
from cnnlab.train import evaluate, train_and_evaluate
from cnnlab.train.checkpoint import Checkpoints
from cnnlab.train.experiment import (
    PREPROCESSING_FILE,
    build_experiment,
    initial_state,
    load_run_config,
    normalization_record,
)
from cnnlab.train.writers import write_json_atomic


def _reference(exp, state, images):
    logits = exp.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             exp.normalize(jnp.asarray(images)), training=False)
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on a generated folder tree (40x30 JPEGs, centre-cropped with a bicubic
    filter to 16x16), the trainer's own outputs on its test split, copies of some images, and
    then the tree and its cache deleted."""
    tmp = tmp_path_factory.mktemp("inference")
    root = testing.make_tree(tmp / "tree", {"alpha": 12, "Beta": 12, "gamma": 10}, size=(40, 30))
    config = tiny_config()
    config.batch_size = config.eval_batch_size = 8
    config.data = {**config.data.to_dict(), **testing.folder_config(root, tmp / "cache"), "source": "folder",
                   "image_size": 16, "resize": "crop", "resample": "bicubic", "val_fraction": 0.2}
    run = tmp / "run"
    train_and_evaluate(config, str(run))
    metrics = evaluate(None, str(run), which="best")

    exp = build_experiment(load_run_config(str(run)))
    c = exp.config.checkpoint
    ckpt = Checkpoints(str(run), keep=c.keep, best_metric=c.best_metric, best_mode=c.best_mode)
    state, step = ckpt.restore(initial_state(exp), which="best")
    latest_step = ckpt.latest_step()
    ckpt.close()
    mean_std = exp.config.copy_and_resolve_references()
    mean_std.normalization = "mean_std"
    exp_ms = build_experiment(mean_std)

    test_files = list(exp.dataset.test.files)
    raw = [np.asarray(Image.open(root / f).convert("RGB")) for f in test_files]
    images = tmp / "images"
    for f in test_files:
        (images / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / f, images / f)
    out = {
        "run": run, "tmp": tmp, "images": images, "test_files": test_files, "raw": raw,
        "test_images": exp.dataset.test.images, "test_labels": exp.dataset.test.labels,
        "probs": _reference(exp, state, exp.dataset.test.images), "step": int(step),
        "latest_step": latest_step, "metrics": metrics, "mean_std_config": mean_std,
        "train_images": exp.dataset.train.images,
        "mean_std_probs": _reference(exp_ms, state, exp.dataset.test.images),
    }
    shutil.rmtree(root)
    shutil.rmtree(tmp / "cache")
    return out


@pytest.fixture(scope="module")
def run(trained):
    return cnnlab.load_run(str(trained["run"]))


def test_predict_equals_the_trainers_evaluation_without_the_data(trained, run):
    assert not (trained["tmp"] / "tree").exists()
    assert run.which == "best" and run.step == trained["step"]
    assert run.class_names == ["Beta", "alpha", "gamma"]
    assert set(run.variables) == {"params", "batch_stats"}
    probs = run.predict(trained["test_images"])
    assert probs.dtype == np.float32 and probs.shape == (len(trained["test_files"]), 3)
    np.testing.assert_allclose(probs, trained["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), trained["probs"].argmax(-1))
    accuracy = float(np.mean(probs.argmax(-1) == trained["test_labels"]))
    assert accuracy == pytest.approx(trained["metrics"]["test/accuracy"])
    np.testing.assert_allclose(run.predict(trained["test_images"], batch_size=3), probs, rtol=1e-5, atol=1e-6)


def test_images_of_any_size_are_resized_as_the_data_pipeline_does(trained, run):
    raw = trained["raw"]
    assert raw[0].shape == (30, 40, 3)
    np.testing.assert_array_equal(run.prepare(raw), trained["test_images"])  # crop + bicubic
    stretched = prepare_images(raw, image_size=16)  # another resize mode gives other pixels
    assert not np.array_equal(stretched, trained["test_images"])
    expected = run.predict(trained["test_images"])
    np.testing.assert_allclose(run.predict(np.stack(raw)), expected, rtol=1e-6, atol=1e-7)
    mixed = [raw[0], np.asarray(Image.fromarray(raw[1]).resize((23, 57))), raw[2]]
    got = run.predict(mixed)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got[[0, 2]], expected[[0, 2]], rtol=1e-6, atol=1e-7)
    single = run.predict(raw[0])
    assert single.shape == (1, 3)
    np.testing.assert_allclose(single[0], expected[0], rtol=1e-6, atol=1e-7)


def test_float_images_are_0_to_255_unless_all_values_are_in_0_1(trained, run):
    x = np.stack(trained["raw"])
    expected = run.predict(x)
    np.testing.assert_array_equal(run.prepare(x.astype(np.float32)), run.prepare(x))
    np.testing.assert_array_equal(run.prepare(x / 255.0), run.prepare(x))
    np.testing.assert_allclose(run.predict(x.astype(np.float32) / 255.0), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run.predict(x.astype(np.float64)), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(run.prepare([x[0], x[1] / 255.0]), run.prepare(x[:2]))
    # A dark float image with values above 1 is read as 0..255, not rescaled.
    dark = np.full((16, 16, 3), 2.0, np.float32)
    assert run.prepare(dark).max() == 2
    grey = x[0, ..., 0]
    np.testing.assert_array_equal(run.prepare(grey), run.prepare(np.repeat(grey[..., None], 3, -1)))
    with pytest.raises(ValueError, match=r"shape \(4, 4, 2\)"):
        run.predict(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="no images"):
        run.predict([])


def test_which_latest_best_fallback_and_bad_run_directories(trained, tmp_path):
    latest = cnnlab.load_run(str(trained["run"]), which="latest")
    assert latest.which == "latest" and latest.step == trained["latest_step"]
    copy = tmp_path / "run"
    shutil.copytree(trained["run"], copy)
    shutil.rmtree(copy / "checkpoints" / "best")
    fallback = cnnlab.load_run(str(copy))
    assert fallback.which == "latest" and fallback.step == trained["latest_step"]
    with pytest.raises(ValueError, match="which='final'"):
        cnnlab.load_run(str(trained["run"]), which="final")
    with pytest.raises(FileNotFoundError, match="config.json"):
        cnnlab.load_run(str(tmp_path / "nowhere"))
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
        cnnlab.load_run(str(copy))


def test_mean_std_runs_use_the_recorded_training_statistics(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained["run"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["normalization"] = "mean_std"
    (copy / "config.json").write_text(json.dumps(config))
    (copy / PREPROCESSING_FILE).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=PREPROCESSING_FILE):
        cnnlab.load_run(str(copy))
    record = normalization_record(trained["mean_std_config"], trained["train_images"])
    assert len(record["mean"]) == len(record["std"]) == 3
    write_json_atomic(str(copy / PREPROCESSING_FILE), record)
    probs = cnnlab.load_run(str(copy)).predict(trained["test_images"])
    np.testing.assert_allclose(probs, trained["mean_std_probs"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(probs, trained["probs"], atol=1e-3)  # the statistics are applied


def _cli(capsys, *argv):
    predict_main([f"--workdir={argv[0]}", *argv[1:]])
    return capsys.readouterr()


def test_cli_table_csv_and_json(trained, run, capsys):
    images, files = trained["images"], trained["test_files"]
    paths = [str(images / f) for f in files]
    probs = run.predict(run.read_images(paths)[0])
    out = json.loads(_cli(capsys, trained["run"], "--format=json", "--top_k=2", str(images)).out)
    assert [r["file"] for r in out] == sorted(paths)
    for r in out:
        p = probs[paths.index(r["file"])]
        top = np.argsort(-p)[:2]
        assert [x["class"] for x in r["predictions"]] == [run.class_names[j] for j in top]
        np.testing.assert_allclose([x["probability"] for x in r["predictions"]], p[top], atol=1e-6)

    rows = list(csv.DictReader(io.StringIO(_cli(capsys, trained["run"], paths[0], "--format=csv", paths[1]).out)))
    assert [r["file"] for r in rows] == paths[:2]
    assert list(rows[0]) == ["file", "class_1", "probability_1", "class_2", "probability_2",
                             "class_3", "probability_3"]  # top_k 5 capped at the 3 classes
    assert rows[1]["class_1"] == run.class_names[int(probs[1].argmax())]
    assert float(rows[1]["probability_1"]) == pytest.approx(float(probs[1].max()), abs=1e-6)

    table = _cli(capsys, trained["run"], paths[0], "--which=latest", "--top_k=1").out.splitlines()
    assert table[0].split() == ["file", "top", "1"]
    name, cls, p = table[1].split()
    latest = cnnlab.load_run(str(trained["run"]), which="latest").predict(trained["raw"][0])[0]
    assert (name, cls) == (paths[0], run.class_names[int(latest.argmax())])
    assert float(p) == pytest.approx(float(latest.max()), abs=1e-3)


def test_cli_reports_unreadable_files_and_classifies_the_rest(trained, capsys, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(trained["images"], folder)
    (folder / "alpha" / "notes.txt").write_text("not an image, not listed")
    (folder / "broken.jpg").write_bytes(b"this is no JPEG")
    testing.truncate_file(next((folder / "alpha").glob("*.jpg")), 0.3)
    result = _cli(capsys, trained["run"], "--format=json", str(folder), str(tmp_path / "missing.png"))
    classified = {r["file"] for r in json.loads(result.out)}
    assert len(classified) == len(trained["test_files"]) - 1
    assert str(folder / "broken.jpg") in result.err and "missing.png: no such file" in result.err
    assert "2 of" in result.err and "notes.txt" not in result.out + result.err

    with pytest.raises(SystemExit) as exit_info:
        _cli(capsys, trained["run"], str(folder / "broken.jpg"))
    assert exit_info.value.code not in (0, None)
    assert "broken.jpg: cannot read" in capsys.readouterr().err


def test_cli_progress_bar_for_many_files_and_help_lists_only_its_flags(trained, capsys, tmp_path):
    src = trained["images"] / trained["test_files"][0]
    for i in range(25):
        shutil.copy(src, tmp_path / f"copy_{i:02d}.jpg")
    result = _cli(capsys, trained["run"], "--top_k=1", str(tmp_path))
    assert len(result.out.splitlines()) == 26 and "cnnlab predict" in result.err and "25/25" in result.err
    with pytest.raises(SystemExit) as exit_info:
        predict_main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--workdir", "--which", "--top_k", "--format", "PATH"):
        assert flag in help_text
    assert "helpfull" not in help_text and "--jax" not in help_text


def test_import_cnnlab_stays_light():
    code = ("import sys, cnnlab; assert 'cnnlab.inference' not in sys.modules; cnnlab.load_run; "
            "assert 'load_run' in dir(cnnlab) and not [m for m in sys.modules if m.startswith(('jax', 'flax'))]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readmes_python_example_runs(trained, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import numpy as np\n.*?)```", readme, re.S).group(1)
    assert '"runs/smoke"' in block and "(32, 32, 3)" in block
    code = block.replace('"runs/smoke"', repr(str(trained["run"]))).replace("(32, 32, 3)", "(16, 16, 3)")
    exec(compile(code, "README.md", "exec"), {})
    names = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(names) == 2 and set(names) <= set(cnnlab.load_run(str(trained["run"])).class_names)


def test_cli_reads_every_image_format_pillow_does_in_a_folder(trained, run, capsys, tmp_path):
    # TIFF, BMP, WebP, PNG, GIF and PPM files in a folder are classified (TIFF used to be skipped).
    from PIL import Image

    src = trained["images"] / trained["test_files"][0]
    image = Image.open(src).convert("RGB")
    for ext in ("tif", "tiff", "bmp", "webp", "png", "gif", "ppm"):
        image.save(tmp_path / f"img.{ext}", **({"lossless": True} if ext == "webp" else {}))
    out = json.loads(_cli(capsys, trained["run"], "--format=json", "--top_k=1", str(tmp_path)).out)
    assert sorted(r["file"].rsplit(".", 1)[1] for r in out) == sorted(["tif", "tiff", "bmp", "webp", "png", "gif", "ppm"])
    want = run.class_names[int(run.predict(np.asarray(image)[None])[0].argmax())]
    lossless = [r for r in out if r["file"].rsplit(".", 1)[1] in ("tif", "tiff", "bmp", "png", "ppm")]
    assert all(r["predictions"][0]["class"] == want for r in lossless)


def test_eval_views_average_the_crops_logits_and_single_is_the_plain_output():
    import jax
    import ml_collections

    from cnnlab import models
    from cnnlab.inference import check_exportable_views
    from cnnlab.train.steps import EVAL_VIEWS, eval_logits, view_images

    model = models.get_model("simple_cnn", num_classes=3, widths=(4,), dense_units=8)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    plain = model.apply(variables, x, training=False)
    np.testing.assert_allclose(eval_logits(model, variables, x), plain, rtol=1e-6)
    for views in ("crops5", "scales3"):
        crops = view_images(x, views)
        assert len(crops) == len(EVAL_VIEWS[views]) and all(c.shape == x.shape for c in crops)
        want = np.mean([np.asarray(model.apply(variables, c, training=False)) for c in crops], axis=0)
        np.testing.assert_allclose(eval_logits(model, variables, x, views=views), want, rtol=1e-5, atol=1e-6)
        both = np.mean([np.asarray(model.apply(variables, v, training=False))
                        for c in crops for v in (c, c[:, :, ::-1])], axis=0)
        np.testing.assert_allclose(eval_logits(model, variables, x, flip=True, views=views), both,
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(view_images(x, "scales3")[0], x)
    assert not np.allclose(view_images(x, "crops5")[0], x)
    # exports compute single views only: a run averaging crops is refused, not exported wrong
    with pytest.raises(ValueError, match="eval_views='crops5'"):
        check_exportable_views(ml_collections.ConfigDict({"eval_views": "crops5"}))
    check_exportable_views(ml_collections.ConfigDict({"eval_flip": True}))
