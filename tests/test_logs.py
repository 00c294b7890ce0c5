"""Logs and pictures: TensorBoard tags, the logged learning rate, the augmented-batch grid, the
plots' epoch ticks and the confusion matrix's titles (issue 12, item 6)."""

import collections
import shutil
import struct

import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image
from tensorboardX.proto import event_pb2

from cnnlab import data as data_lib
from cnnlab.sweep.report import format_values
from cnnlab.train import train_and_evaluate
from cnnlab.train.experiment import build_experiment, resolve
from cnnlab.train.optim import learning_rate_at
from cnnlab.train.report import plot_confusion, plot_curves
from cnnlab.train.writers import MetricWriter, image_grid, read_metrics, tensorboard_tag

LR, DECAY = 3e-3, 0.25


def _events(tb_dir, *, purged: bool = False) -> dict[str, list]:
    """``{tag: [(step, value)]}`` from the TFRecord-framed event files (a scalar's value, or an
    image's ``(height, width)``). ``purged``: as TensorBoard shows them, read in file order with
    its restart rule for files of ``file_version`` 2 (tensorboard's EventAccumulator): a
    ``SessionLog.START`` event at step ``s`` discards every point read so far at step >= ``s``,
    in every tag."""
    tags = collections.defaultdict(list)
    for path in sorted(tb_dir.glob("events.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if purged and event.session_log.status == event_pb2.SessionLog.START:
                for points in tags.values():
                    points[:] = [(s, v) for s, v in points if s < event.step]
            for v in event.summary.value:
                value = (v.image.height, v.image.width) if v.HasField("image") else v.simple_value
                tags[v.tag].append((event.step, value))
    return tags


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("logs")
    config = tiny_config()
    config.log_every_steps = 1
    config.optimizer.learning_rate = LR
    config.schedule.name = "keras_decay"
    config.schedule.keras_decay.decay = DECAY
    config.schedule.warmup_epochs = 1.0
    train_and_evaluate(config, str(workdir))
    return workdir, config, read_metrics(str(workdir / "metrics.jsonl"))


def test_tensorboard_keeps_per_step_and_per_epoch_values_under_distinct_tags(run):
    workdir, _, records = run
    assert tensorboard_tag("train", "loss") == "step/loss"
    assert tensorboard_tag("epoch", "train/loss") == "train/loss"
    tags = _events(workdir / "tb")
    steps = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    step_tags = {t for t in tags if t.startswith("step/")}
    assert {"step/loss", "step/accuracy", "step/learning_rate", "step/images_per_sec"} <= step_tags
    assert {"train/loss", "train/accuracy", "val/accuracy", "test/loss"} <= set(tags)
    # Each tag holds one kind of value: per-batch values at every step, epoch means at epoch ends.
    assert [s for s, _ in tags["step/loss"]] == [r["step"] for r in steps]
    assert [v for _, v in tags["step/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [s for s, _ in tags["train/loss"]] == [r["step"] for r in epochs]
    assert [v for _, v in tags["train/loss"]] == pytest.approx([r["train/loss"] for r in epochs], rel=1e-6)
    assert [v for _, v in tags["step/images_per_sec"]] == pytest.approx([r["images_per_sec"] for r in steps],
                                                                        rel=1e-6)


def test_learning_rate_logged_at_each_log_step_is_the_schedules(run):
    _, config, records = run
    steps = [r for r in records if r["kind"] == "train"]
    first_epoch = next(r for r in records if r["kind"] == "epoch")
    per_epoch = first_epoch["step"] // first_epoch["epoch"]
    assert [r["step"] for r in steps] == list(range(1, config.num_epochs * per_epoch + 1))
    for r in steps:
        count = r["step"] - 1  # the update of the batch that ended at this step
        # one epoch of linear warmup from 0, then Keras 2's lr / (1 + decay * updates)
        want = LR * count / per_epoch if count < per_epoch else LR / (1 + DECAY * (count - per_epoch))
        assert r["learning_rate"] == pytest.approx(want, rel=1e-5), r
        assert r["learning_rate"] == pytest.approx(learning_rate_at(config, per_epoch, count), rel=1e-6)


def test_the_augmented_first_batch_is_saved_as_a_grid_and_sent_to_tensorboard(run):
    workdir, config, _ = run
    image = np.asarray(Image.open(workdir / "augmented_batch.png"))
    # 16 images of 16x16, enlarged 4x to 64x64, 4 x 4 with 2-pixel borders.
    assert image.shape == (4 * 66 + 2, 4 * 66 + 2, 3) and image.dtype == np.uint8
    assert _events(workdir / "tb")["augmented_batch"] == [(0, image.shape[:2])]
    # not the plain first batch: the grid went through the augmentation ops
    train = build_experiment(resolve(config)).dataset.train
    batch = next(data_lib.iterate_train(train.images, train.labels, config.batch_size, seed=config.seed))
    plain = image_grid(batch["image"][:16])
    assert plain.shape == image.shape and not np.array_equal(image, plain)


def test_image_grid_tiles_and_enlarges_exactly():
    images = np.arange(5 * 8 * 8 * 3).reshape(5, 8, 8, 3) % 256
    grid = image_grid(images, columns=2, pad=1, min_tile=16)
    assert grid.shape == (3 * 17 + 1, 2 * 17 + 1, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:17:2, 18:34:2], images[1])  # row 0, column 1, 2x nearest
    assert (grid[35:, 18:] == 255).all()  # the missing sixth image is blank


def _epoch_records(n):
    return [{"kind": "epoch", "step": 10 * e, "epoch": e, "train/loss": 1 / e, "train/accuracy": e / n,
             "val/loss": 1.1 / e, "val/accuracy": e / n, "test/loss": 1.2 / e, "test/accuracy": e / n}
            for e in range(1, n + 1)]


@pytest.mark.parametrize("epochs", [3, 7, 45])
def test_curves_have_integer_epoch_ticks_and_labelled_splits(tmp_path, epochs):
    fig = plot_curves(_epoch_records(epochs), str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").exists()
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert all(lab.get_text().lstrip("−-").isdigit() for lab in ax.get_xticklabels() if lab.get_text())
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (epoch mean)", "val", "test"]


def test_confusion_matrix_titles_say_what_the_cells_hold(tmp_path):
    confusion = np.array([[18, 2, 0], [0, 20, 0], [1, 0, 19]])
    fig = plot_confusion(confusion, ["a", "b", "c"], str(tmp_path / "cm.png"), split="val", checkpoint="best")
    assert fig.get_suptitle() == "Confusion matrix: val split, best checkpoint (60 images, 3 classes)"
    counts, norm = fig.axes[:2]
    assert counts.get_title() == "Counts (images)"
    assert norm.get_title() == "Row-normalized (% of each true class)"
    assert [t.get_text() for t in counts.texts] == ["18", "2", "20", "1", "19"]  # zeros blank
    assert [t.get_text() for t in norm.texts] == ["90", "10", "100", "5", "95"]
    big = plot_confusion(np.eye(40, dtype=int) * 3, [f"c{i}" for i in range(40)], str(tmp_path / "big.png"))
    assert "test split, latest checkpoint" in big.get_suptitle()
    assert not big.axes[0].texts and not big.axes[1].texts  # no per-cell text beyond 30 classes


def test_trial_labels_name_the_swept_values():
    values = {"optimizer.learning_rate": 1e-3, "model.kwargs.dropout": 0.3, "seed": 1}
    assert format_values(values) == "learning_rate=0.001, dropout=0.3, seed=1"
    assert format_values({}) == ""


@pytest.mark.slow
def test_tensorboard_holds_every_finished_epoch_when_the_run_is_killed(tmp_path):
    # SIGKILL right after epoch 1 (3 steps of the tiny config): its points are on disk, as the
    # trainer flushes TensorBoard every epoch (tensorboardX alone flushes every 2 minutes).
    import os
    import subprocess
    import sys

    from helpers import SMOKE, TINY

    overrides = [f"--config.{line.split(' = ')[0][2:]}={line.split(' = ')[1]}"
                 for line in TINY.strip().splitlines()]
    env = {**os.environ, "CNNLAB_FAULT_KILL_AT_STEP": "3"}
    run = subprocess.run([sys.executable, "-m", "cnnlab", "train", f"--config={SMOKE}",
                          f"--workdir={tmp_path / 'run'}", *overrides, "--config.checkpoint.every_steps=0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    epochs = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1]
    tags = _events(tmp_path / "run" / "tb")
    assert [s for s, _ in tags["val/accuracy"]] == [epochs[0]["step"]]


def _assert_each_step_once(tb_dir, records):
    """TensorBoard, as it shows ``tb_dir``, holds every tag's points at the steps of
    ``metrics.jsonl``'s ``records``, each step once and with its values (augmented_batch: at 0)."""
    steps = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    shown = _events(tb_dir, purged=True)
    assert {"step/loss", "train/loss", "augmented_batch"} <= set(shown)
    for tag, points in shown.items():
        if tag == "augmented_batch":
            assert [s for s, _ in points] == [0]
            continue
        kind = steps if tag.startswith("step/") else epochs
        assert [s for s, _ in points] == [r["step"] for r in kind], tag  # each step once, in order
        key = tag[len("step/"):] if tag.startswith("step/") else tag
        assert [v for _, v in points] == pytest.approx([r[key] for r in kind], rel=1e-6), tag


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path):
    # 2 epochs, then resumed from epoch 1 (as after a kill past epoch 2's points, before its
    # checkpoint) to 3: epoch 2's first points are replaced, in per-step and per-epoch tags.
    config = tiny_config()
    config.log_every_steps = 1
    config.checkpoint.every_steps = 0  # checkpoints at epoch ends only
    train_and_evaluate(config, str(tmp_path))
    latest = tmp_path / "checkpoints" / "latest"
    per_epoch, last = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    shutil.rmtree(latest / str(last))
    config.num_epochs = 3
    train_and_evaluate(config, str(tmp_path), allow_config_change=True)

    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 3 * per_epoch + 1))
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert len(_events(tmp_path / "tb")["step/loss"]) == 4 * per_epoch  # steps 1-6, then 4-9 again
    _assert_each_step_once(tmp_path / "tb", records)
    assert {"step/learning_rate", "val/accuracy", "test/loss", "epoch"} <= set(_events(tmp_path / "tb"))


def test_tensorboard_holds_each_step_once_after_starting_over_within_a_second(tmp_path):
    # Three starts of MetricWriter in the same second: a first one (steps 1-6); one from
    # scratch (a run killed before its first checkpoint starts over, step 0 included); one
    # resumed from step 3 (steps 4-9).
    def start(resume_step, last, tag):
        writer = MetricWriter(str(tmp_path), resume_step=resume_step)
        if not resume_step:
            writer.write_image("augmented_batch", np.zeros((4, 4, 3), np.uint8), 0)
        for step in range(resume_step + 1, last + 1):
            writer.write("train", step, {"loss": tag + step})
            if step % 3 == 0:
                writer.write("epoch", step, {"epoch": step // 3, "train/loss": tag + step / 3})
        writer.close()

    start(0, 6, 100.0)
    start(0, 6, 200.0)
    start(3, 9, 300.0)
    assert len(list((tmp_path / "tb").glob("events.*"))) == 3  # none emptied by a later one
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["loss"] for r in records if r["kind"] == "train"] == [201, 202, 203, *range(304, 310)]
    _assert_each_step_once(tmp_path / "tb", records)
