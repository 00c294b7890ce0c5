"""Run-directory records (cnnlab.train.rundir): split, environment, config and its history."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from importlib import metadata
from pathlib import Path

import jax
import pytest

import cnnlab.data as D
from cnnlab.data import testing
from cnnlab.train import rundir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _all_files(workdir: Path) -> list[Path]:
    return sorted(p for p in workdir.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- split


def test_split_record_lists_every_split_and_checks_equal_data(tmp_path):
    old_umask = os.umask(0o077)  # the files must be world-readable whatever the umask
    try:
        ds = D.load_dataset(
            {
                "source": "synthetic",
                "synthetic_per_class": 10,
                "image_size": 8,
                "val_fraction": 0.2,
            },
            verbose=False,
        )
        record = rundir.write_split_record(tmp_path, ds)
    finally:
        os.umask(old_umask)
    on_disk = json.loads((tmp_path / "split.json").read_text())
    assert on_disk == record and set(on_disk["splits"]) == {"train", "val", "test"}
    for name, entry in on_disk["splits"].items():
        assert entry["files"] == ds.split_files[name] == sorted(getattr(ds, name).files)
        assert entry["count"] == len(getattr(ds, name))
        assert entry["sha256"] == hashlib.sha256("\n".join(entry["files"]).encode()).hexdigest()
    assert on_disk["skipped"] == [] and on_disk["protocol"]["val_fraction"] == 0.2
    assert _mode(tmp_path / "split.json") == 0o644
    assert [p.name for p in _all_files(tmp_path)] == ["split.json"]  # no temporary file left
    again = D.load_dataset(ds.config, verbose=False)
    rundir.check_split(tmp_path, again)  # same data, same split: quiet


@pytest.mark.parametrize("change", ["remove", "add", "unreadable"])
def test_check_split_detects_changed_data(tmp_path, change):
    root = testing.make_tree(tmp_path / "tree", {"a": 10, "b": 9, "c": 8})
    cfg = testing.folder_config(root, tmp_path / "cache", val_fraction=0.2)
    ds = D.load_dataset(cfg, verbose=False)
    rundir.write_split_record(tmp_path / "run", ds)
    home = {f: name for name, files in ds.split_files.items() for f in files}
    if change == "remove":
        (root / "b" / "image_0003.jpg").unlink()
        expect = rf"1 file\(s\) no longer in the data or unreadable: b/image_0003.jpg \(was {home['b/image_0003.jpg']}\)"
    elif change == "unreadable":
        testing.truncate_file(root / "a" / "image_0005.jpg", 0.3)
        expect = rf"1 file\(s\) no longer in the data or unreadable: a/image_0005.jpg \(was {home['a/image_0005.jpg']}\)"
    else:
        testing.write_image(root / "c" / "image_0100.jpg", 77)
        expect = r"1 new file\(s\): c/image_0100.jpg;"
    if change == "unreadable":
        with pytest.warns(UserWarning, match="a/image_0005.jpg"):
            changed = D.load_dataset(cfg, verbose=False)
        # Only the unreadable file left its split: nothing else moved.
        expect += rf"; {home['a/image_0005.jpg']}: 1 file\(s\) removed \(a/image_0005.jpg\)\. "
    else:
        changed = D.load_dataset(cfg, verbose=False)
    with pytest.raises(rundir.SplitChangedError, match=expect) as info:
        rundir.check_split(tmp_path / "run", changed)
    assert "split.json" in str(info.value) and "fresh directory" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_check_split_for_an_evaluation_returns_a_changed_training_split_as_a_warning(tmp_path):
    # An evaluation reads val and test only: a training image gone is a warning for it (a
    # resume still refuses); a test image gone is refused for both.
    root = testing.make_tree(tmp_path / "tree", {"a": 10, "b": 9, "c": 8})
    cfg = testing.folder_config(root, tmp_path / "cache", val_fraction=0.2)
    ds = D.load_dataset(cfg, verbose=False)
    run = tmp_path / "run"
    rundir.write_split_record(run, ds)
    assert rundir.check_split(run, ds, used=("val", "test")) is None
    train_image, test_image = ds.split_files["train"][0], ds.split_files["test"][0]
    testing.truncate_file(root / train_image, 0.3)
    with pytest.warns(UserWarning, match=train_image):
        changed = D.load_dataset(cfg, verbose=False)
    note = rundir.check_split(run, changed, used=("val", "test"))
    assert note == (f"the data no longer gives the train split recorded in {run / 'split.json'} (1 file(s) "
                    f"no longer in the data or unreadable: {train_image} (was train); train: 1 file(s) "
                    f"removed ({train_image})); val and test are as recorded")
    with pytest.raises(rundir.SplitChangedError, match=train_image):
        rundir.check_split(run, changed)
    testing.truncate_file(root / test_image, 0.3)
    with pytest.warns(UserWarning, match=test_image):
        changed = D.load_dataset(cfg, verbose=False)
    with pytest.raises(rundir.SplitChangedError, match=rf"test: 1 file\(s\) removed \({test_image}\)"):
        rundir.check_split(run, changed, used=("val", "test"))


def test_check_split_reports_val_fraction_change_and_old_runs_warn(tmp_path):
    base = {"source": "synthetic", "synthetic_per_class": 10, "image_size": 8}
    ds = D.load_dataset({**base, "val_fraction": 0.0}, verbose=False)
    with pytest.warns(UserWarning, match="no split.json"):
        rundir.check_split(tmp_path, ds)
    rundir.write_split_record(tmp_path, ds)
    with pytest.raises(
        rundir.SplitChangedError,
        match=r"split.json: train: 3 file\(s\) removed \([^)]+\); val: 3 added \([^)]+\)\.",
    ):
        rundir.check_split(tmp_path, D.load_dataset({**base, "val_fraction": 0.1}, verbose=False))


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("setting", ["auto", "onednn/xla/xla", "xla", "xla/phase/xla"])
def test_environment_records_onednn_only_where_it_may_run(tmp_path, monkeypatch, setting):
    from cnnlab.native import onednn

    monkeypatch.setenv("CNNLAB_CONV_FORMULATION", setting)
    if "onednn" in setting and not onednn.available():
        pytest.skip("oneDNN unavailable here: forcing it is an error, tested in test_onednn.py")
    env = rundir.write_environment(tmp_path)
    assert env["conv_formulation"] == setting
    if "onednn" in setting or setting == "auto":
        assert env["onednn"] == (f"oneDNN {onednn.version()}" if onednn.available()
                                 else f"unavailable: {onednn.unavailable_reason()}")
    else:
        assert env["onednn"] == f"not used (CNNLAB_CONV_FORMULATION={setting})"


def test_write_environment(tmp_path):
    env = rundir.write_environment(tmp_path)
    assert json.loads((tmp_path / "environment.json").read_text()) == env
    assert _mode(tmp_path / "environment.json") == 0o644
    assert env["cnnlab"] == metadata.version("cnnlab")
    for name in ("jax", "jaxlib", "flax", "optax"):
        assert env[name] == metadata.version(name)
    assert env["devices"] == [str(d) for d in jax.devices()] and env["process_count"] == 1
    assert env["python"] and env["platform"] and env["backend"] == jax.default_backend()
    source = Path(rundir.__file__).resolve().parents[2]
    if (source / ".git").exists():
        assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)
    # The same environment again: no history. Another one (other devices): the old one is kept.
    rundir.write_environment(tmp_path)
    assert not (tmp_path / "environment_history").exists()
    old = {**env, "devices": ["cuda:0", "cuda:1"]}
    (tmp_path / "environment.json").write_text(json.dumps(old))
    rundir.write_environment(tmp_path)
    kept = tmp_path / "environment_history" / "environment.0001.json"
    assert json.loads(kept.read_text())["devices"] == ["cuda:0", "cuda:1"]
    assert _mode(kept) == 0o644


def test_git_state_fails_quietly_outside_a_checkout(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    assert rundir._git_state(tmp_path) is None


# --------------------------------------------------------------------------- config


def _config(**kw):
    cfg = {
        "seed": 0,
        "num_epochs": 5,
        "progress": True,
        "log_every_steps": 20,
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "data": {"data_dir": "/a", "num_workers": -1, "image_size": [96, 96], "val_fraction": 0.1},
    }
    for key, value in kw.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        if value is _DROP:
            del node[leaf]
        else:
            node[leaf] = value
    return cfg


_DROP = object()


def test_record_config_fresh_same_and_operational(tmp_path):
    assert rundir.record_config(tmp_path, _config(data__image_size=(96, 96)), step=0) == {}
    assert json.loads((tmp_path / "config.json").read_text()) == _config()
    assert _mode(tmp_path / "config.json") == 0o644
    assert rundir.record_config(tmp_path, _config(), step=100) == {}
    # Keys that do not change results may change silently; config.json takes the new values.
    ops = _config(progress=False, log_every_steps=5, data__data_dir="/b", data__num_workers=0)
    assert rundir.record_config(tmp_path, ops, step=200) == {}
    assert json.loads((tmp_path / "config.json").read_text()) == ops
    assert not (tmp_path / "config_changes.jsonl").exists()
    assert not (tmp_path / "config_history").exists()


def test_record_config_refuses_a_change_naming_every_key(tmp_path):
    rundir.record_config(tmp_path, _config(), step=0)
    before = (tmp_path / "config.json").read_text()
    changed = _config(
        optimizer__learning_rate=1e6,
        num_epochs=6,
        seed=_DROP,
        data__augment="tutorial",
        progress=False,
    )
    with pytest.raises(rundir.ConfigChangedError) as info:
        rundir.record_config(tmp_path, changed, step=500)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    for part in (
        "optimizer.learning_rate: 0.01 -> 1000000.0",
        "num_epochs: 5 -> 6",
        'seed: 0 -> "<absent>"',
        'data.augment: "<absent>" -> "tutorial"',
        "4 key(s)",
        "--allow_config_change",
    ):
        assert part in msg, part
    assert "progress" not in msg
    assert (tmp_path / "config.json").read_text() == before  # nothing recorded on refusal
    assert not (tmp_path / "config_changes.jsonl").exists()


def test_record_config_allowed_change_keeps_history(tmp_path):
    first = _config()
    rundir.record_config(tmp_path, first, step=0)
    second = _config(optimizer__learning_rate=0.1)
    changes = rundir.record_config(tmp_path, second, step=300, allow_config_change=True)
    assert changes == {"optimizer.learning_rate": (0.01, 0.1)}
    third = _config(optimizer__learning_rate=0.1, num_epochs=9)
    rundir.record_config(tmp_path, third, step=600, allow_config_change=True)
    assert json.loads((tmp_path / "config.json").read_text()) == third
    history = sorted((tmp_path / "config_history").iterdir())
    assert [p.name for p in history] == ["config.0001.json", "config.0002.json"]
    assert [json.loads(p.read_text()) for p in history] == [first, second]
    log = [
        json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()
    ]
    assert [(e["step"], e["changes"], e["previous"]) for e in log] == [
        (300, {"optimizer.learning_rate": [0.01, 0.1]}, "config_history/config.0001.json"),
        (600, {"num_epochs": [5, 9]}, "config_history/config.0002.json"),
    ]
    assert all(e["time"] for e in log)
    files = _all_files(tmp_path)
    assert all(_mode(p) == 0o644 for p in files)
    assert not [p for p in files if p.name.startswith(".tmp")]


def test_record_config_check_only_refuses_alike_and_writes_nothing(tmp_path):
    config = {"seed": 0, "optimizer": {"learning_rate": 1e-3}}
    assert rundir.record_config(tmp_path, config, step=0, check_only=True) == {}
    assert not (tmp_path / rundir.CONFIG_FILE).exists()  # a fresh run: nothing written
    rundir.record_config(tmp_path, config, step=0)
    changed = {"seed": 0, "optimizer": {"learning_rate": 1.0}}
    with pytest.raises(rundir.ConfigChangedError, match="optimizer.learning_rate: 0.001 -> 1.0"):
        rundir.record_config(tmp_path, changed, step=5, check_only=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert rundir.record_config(tmp_path, changed, step=5, allow_config_change=True, check_only=True) == {
        "optimizer.learning_rate": (0.001, 1.0)}
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no history, no change log
    assert json.loads((tmp_path / rundir.CONFIG_FILE).read_text()) == config
