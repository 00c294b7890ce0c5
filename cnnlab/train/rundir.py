"""What a run directory records so that its results can be trusted later.

* ``split.json``: each split's sorted file names and their sha256, and the unreadable files
  dropped from their splits; :func:`check_split` refuses data that no longer gives this split
  (or, for an evaluation, the splits it reads).
* ``environment.json``: cnnlab version and git commit, Python/JAX/Flax/Optax versions, platform
  and devices of the latest start (a different earlier one moves to ``environment_history/``).
* ``conv_formulations.json``: the convolution formulation chosen for each shape (by machine),
  which a resume on that machine compiles again rather than measuring anew.
* ``config.json``: the resolved config (``mixed_precision: "auto"`` as decided here); :func:`record_config` refuses a resume with another
  config unless allowed, then keeps the old one in ``config_history/`` and the change with its
  step in ``config_changes.jsonl``.

Every file is written atomically (temporary file + rename) with mode 0644. Call these on the
main process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Collection, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from cnnlab import runfiles, runtime
from cnnlab.data.dataset import Dataset
from cnnlab.native import conv_impl, onednn
from cnnlab.schema import flatten, keys_without_effect, legacy_values
from cnnlab.train.writers import write_json_atomic, write_text_atomic

SPLIT_FILE = runfiles.SPLIT
ENVIRONMENT_FILE = runfiles.ENVIRONMENT
FORMULATIONS_FILE = runfiles.FORMULATIONS
CONFIG_FILE = runfiles.CONFIG
CONFIG_CHANGES_FILE = runfiles.CONFIG_CHANGES

_ABSENT = "<absent>"


class SplitChangedError(ValueError):
    """The data on disk no longer gives the split a run recorded."""


class ConfigChangedError(ValueError):
    """A run is resumed with a config that differs from the one it recorded."""


# --------------------------------------------------------------------------- split


def _digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def write_split_record(workdir: str | os.PathLike, dataset: Dataset) -> dict[str, Any]:
    """Writes ``split.json`` for a :class:`cnnlab.data.Dataset` and returns the record."""
    record = {
        "splits": {
            name: {"count": len(files), "sha256": _digest(files), "files": files}
            for name, files in dataset.split_files.items()
        },
        "skipped": list(dataset.manifest.get("skipped", [])),
        "class_names": list(dataset.class_names),
        "source": dataset.manifest.get("source_dir", dataset.config.get("source")),
        "protocol": {
            k: dataset.config.get(k)
            for k in ("split", "split_seed", "test_fraction", "train_per_class", "val_fraction")
        } | ({"folds": {"folds": dataset.config["folds"], "fold": dataset.config["fold"]}}
             if dataset.config.get("folds") else {}),
    }
    write_json_atomic(os.path.join(workdir, SPLIT_FILE), record)
    return record


def _examples(items: list[str], limit: int = 3) -> str:
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_split(
    workdir: str | os.PathLike, dataset: Dataset, *, used: Collection[str] | None = None
) -> str | None:
    """Raises :class:`SplitChangedError` when ``dataset`` does not give the split recorded in
    ``workdir/split.json``: a file added, removed or made unreadable (and, since the split is a
    function of the whole file list, the files that moved with it), or other split settings.

    ``used``: the splits the caller reads (``cnnlab eval``: val and test). A change confined to
    the others (a training image added, removed or unreadable) then raises nothing: it is
    returned, as one line for the caller to warn with. Returns None when nothing changed.

    A run directory without ``split.json`` (written before cnnlab recorded splits) only warns.
    """
    path = os.path.join(workdir, SPLIT_FILE)
    if not os.path.exists(path):
        warnings.warn(
            f"{workdir} has no {SPLIT_FILE} (a run from before splits were recorded): "
            "cannot check that the data gives the split it was trained with",
            stacklevel=2,
        )
        return None
    with open(path) as f:
        recorded = {k: v["files"] for k, v in json.load(f)["splits"].items()}
    current = dataset.split_files
    names = sorted(set(recorded) | set(current))
    changed = [n for n in names if recorded.get(n, []) != current.get(n, [])]
    if not changed:
        return None
    was = {f: n for n in names for f in recorded.get(n, [])}
    now = {f: n for n in names for f in current.get(n, [])}
    gone, new = sorted(set(was) - set(now)), sorted(set(now) - set(was))
    problems = []
    if gone:
        shown = _examples([f"{f} (was {was[f]})" for f in gone])
        problems.append(f"{len(gone)} file(s) no longer in the data or unreadable: {shown}")
    if new:
        problems.append(f"{len(new)} new file(s): {_examples(new)}")
    for n in changed:
        old, cur = set(recorded.get(n, [])), set(current.get(n, []))
        removed, added = sorted(old - cur), sorted(cur - old)
        parts = [f"{len(removed)} file(s) removed ({_examples(removed, 2)})"] if removed else []
        parts += [f"{len(added)} added ({_examples(added, 2)})"] if added else []
        problems.append(f"{n}: {', '.join(parts)}")
    if used is not None and not set(changed) & set(used):
        kept = [n for n in used if n in names]
        return (f"the data no longer gives the {' and '.join(changed)} split recorded in {path} "
                f"({'; '.join(problems)}); {' and '.join(kept)} are as recorded")
    raise SplitChangedError(
        f"the data no longer gives the split recorded in {path}: {'; '.join(problems)}. "
        "Its results would mix images across splits: restore the data the run used "
        f"({SPLIT_FILE} lists every file) or train a new run in a fresh directory"
    )


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_state(directory: Path) -> dict[str, Any] | None:
    """The commit (and whether the package's files differ from it) of the git checkout that
    holds ``directory``; None when there is none or git fails."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                             timeout=20, check=True)
        return run.stdout.strip()

    try:
        # The package must be tracked there: not a copy installed inside someone's repository.
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Versions, git state, platform and devices of this process (see :func:`write_environment`)."""
    devices = jax.devices()
    return {
        "cnnlab": _version("cnnlab"),
        "git": _git_state(Path(__file__).resolve().parents[1]),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("jax", "jaxlib", "flax", "optax")},
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kinds": sorted({d.device_kind for d in devices}),
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **runtime.state(),
        "conv_formulation": os.environ.get(conv_impl.FORMULATION_ENV, "auto"),
        "onednn": _onednn_state(),
        "native_bfloat16": _bfloat16_state(),
        "fallbacks": onednn.announced(),
        "isa_limits": onednn.isa_limits(),
    }


def _bfloat16_state() -> str:
    """Whether this machine computes bfloat16 natively, and why (what ``mixed_precision="auto"``
    decides on)."""
    native, why = conv_impl.native_bfloat16()
    return f"{'yes' if native else 'no'}: {why}"


def _onednn_state() -> str:
    """oneDNN's version where its convolutions can run, else why not (unused under a forced
    formulation without it)."""
    if jax.default_backend() != "cpu":
        return "not used off the CPU backend"
    forced = conv_impl.forced_formulations()
    if forced is not None and "onednn" not in forced:  # not loaded (nor built) for nothing
        return f"not used ({conv_impl.FORMULATION_ENV}={os.environ.get(conv_impl.FORMULATION_ENV)})"
    return f"oneDNN {onednn.version()}" if onednn.available() else f"unavailable: {onednn.unavailable_reason()}"


def _history_path(workdir: str | os.PathLike, folder: str, stem: str) -> str:
    directory = Path(workdir) / folder
    taken = [int(p.name.split(".")[1]) for p in directory.glob(f"{stem}.[0-9]*.json")]
    return str(directory / f"{stem}.{max(taken, default=0) + 1:04d}.json")


def write_environment(workdir: str | os.PathLike) -> dict[str, Any]:
    """Writes ``environment.json`` for this start and returns it; an earlier one that differs
    (a resume on other devices or versions) is kept as ``environment_history/environment.NNNN.json``."""
    env = environment()
    path = os.path.join(workdir, ENVIRONMENT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if {k: v for k, v in old.items() if k != "time"} != env:
            write_json_atomic(_history_path(workdir, "environment_history", "environment"), old)
    env["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(path, env)
    return env


# --------------------------------------------------------------------------- formulations


def pin_formulations(workdir: str | os.PathLike) -> None:
    """Makes this process compile the convolution formulations the run recorded (made on
    this machine), so a resume computes what the uninterrupted run did even where a new
    measurement would choose otherwise; an unreadable record is ignored (measured anew)."""
    try:
        with open(os.path.join(workdir, FORMULATIONS_FILE)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(recorded, dict):
        conv_impl.pin_choices(recorded)


def record_formulations(workdir: str | os.PathLike) -> None:
    """Writes ``conv_formulations.json``: every convolution formulation this process chose
    (by machine and shape), those recorded before kept; unchanged records are not rewritten."""
    path = os.path.join(workdir, FORMULATIONS_FILE)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    merged = {**old, **conv_impl.made_choices()}
    if merged != old:
        write_json_atomic(path, merged)


# --------------------------------------------------------------------------- config


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    # JSON round trip: what config.json will hold (tuples become lists), so old and new compare.
    plain = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(plain, sort_keys=True, default=str))


def _default_values() -> dict[str, Any]:
    """Every training field's default, flattened as ``config.json`` holds it."""
    from cnnlab.train.config import default_config

    return flatten(_plain(default_config()))


def with_legacy_values(workdir: str | os.PathLike, config: Any) -> tuple[Any, dict[str, Any]]:
    """``config`` as the run recorded in ``workdir`` computed it: each field that declares a
    legacy value (``Field.legacy``, e.g. ``optimizer.weight_decay_mask``), absent from the run's
    ``config.json`` (recorded before the field existed) and at its default in ``config``, set to
    its legacy value. Returns ``(config, {key: legacy value set})``; a new run is unchanged."""
    import ml_collections

    from cnnlab.train.config import train_schema

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return config, {}
    with open(path) as f:
        recorded = flatten(json.load(f))
    defaults = _default_values()
    values, changed = config.to_dict(), {}
    for key, legacy in legacy_values(train_schema()).items():
        *sections, field = key.split(".")
        group = values
        for section in sections:
            group = group.get(section, {})
        if key not in recorded and field in group and _plain({"v": group[field]})["v"] == defaults.get(key):
            group[field] = legacy
            changed[key] = legacy
    return (ml_collections.ConfigDict(values) if changed else config), changed


def record_config(
    workdir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    step: int,
    allow_config_change: bool = False,
    check_only: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Records the resolved ``config`` of a run starting or resuming at ``step``.

    A fresh run directory gets ``config.json``. Otherwise the recorded config is compared key
    by key (flattened; fields declared ``affects_results=False`` ignored); any difference raises
    :class:`ConfigChangedError` naming every changed key with both values, unless
    ``allow_config_change``: then the old file is kept as ``config_history/config.NNNN.json``,
    ``{"step", "changes": {key: [old, new]}, "time", "previous"}`` is appended to
    ``config_changes.jsonl`` and ``config.json`` is replaced. Returns the changes
    (``{key: (old, new)}``, empty when none). ``check_only`` refuses the same way but writes
    nothing (the processes of a multi-process run that do not write the run's files).
    """
    new = _plain(config)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        if not check_only:
            write_json_atomic(path, new)
        return {}
    with open(path) as f:
        old = json.load(f)
    old_flat, new_flat = flatten(old), flatten(new)
    keys = sorted({*old_flat, *new_flat})
    pairs = {k: (old_flat.get(k, _ABSENT), new_flat.get(k, _ABSENT)) for k in keys}
    defaults = _default_values()
    from cnnlab.train.config import train_schema

    legacy = legacy_values(train_schema())
    # A field a newer cnnlab added, at its default (or at the value the old run computed with,
    # its legacy value: with_legacy_values), is not a change.
    differ = {k: (a, b) for k, (a, b) in pairs.items()
              if a != b and not (a is _ABSENT and k in defaults
                                 and (b == defaults[k] or b == legacy.get(k, _ABSENT)))}

    without_effect = keys_without_effect(train_schema())
    changes = {k: v for k, v in differ.items() if k not in without_effect}
    if changes and not allow_config_change:
        listed = "; ".join(
            f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items()
        )
        raise ConfigChangedError(
            f"the config differs from the one recorded in {path} ({len(changes)} key(s)): {listed}. "
            "Pass --allow_config_change to resume with the new values (the change and its step "
            f"are then recorded in {CONFIG_CHANGES_FILE}), or use a fresh run directory"
        )
    if check_only:
        return changes
    if changes:
        previous = _history_path(workdir, "config_history", "config")
        write_json_atomic(previous, old)
        entry = {"step": int(step), "changes": {k: list(v) for k, v in changes.items()},
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "previous": os.path.relpath(previous, workdir)}
        log = os.path.join(workdir, CONFIG_CHANGES_FILE)
        text = Path(log).read_text() if os.path.exists(log) else ""
        write_text_atomic(log, text + json.dumps(entry, sort_keys=True) + "\n")
    if differ:
        write_json_atomic(path, new)
    return changes
