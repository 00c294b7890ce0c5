"""What a sweep leaves for a person: ``cnnlab sweep report --workdir=...`` (also run at the end).

Written to the sweep's workdir:

* ``trials.csv`` and ``trials.md``: one row per trial (slot), sorted by the target metric: its
  state, the metric (with ``Sweep(folds=k)`` the mean over folds, their standard deviation and
  each fold's value), every swept field's value, the other val/test/train metrics, pack size,
  duration, retries, error, and its run directory.
* ``params.png``: the metric against each swept field (log axes for log ranges; categories as
  labels; a grid's values as the ticks), pruned trials hollow, each point labelled with the
  trial's other swept values when there are few.
* ``curves.png``: every trial's metric per epoch on one figure, the best in bold, each labelled
  with its swept values (:func:`format_values`) and trial number.
* ``best_config.py``: the best trial's full config as a runnable config file.
* ``importances.json`` (and a section of ``trials.md``): Optuna's parameter importances
  (PED-ANOVA) over the completed trials, when there are enough of them.
* ``summary.json``: best trial, counts by state, the files above.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import statistics
from typing import Any

import ml_collections

from cnnlab import runfiles
from cnnlab.sweep import study as study_lib
from cnnlab.sweep._optuna_adapter import load as load_optuna
from cnnlab.sweep.files import write_config_file
from cnnlab.sweep.space import apply_point
from cnnlab.train.config import selection_metrics
from cnnlab.train.metrics import DEFAULT_METRICS
from cnnlab.train.writers import read_metrics, write_json_atomic, write_text_atomic


def _load(workdir: str, storage: str | None, study_name: str | None):
    path = os.path.join(workdir, study_lib.SWEEP_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {study_lib.SWEEP_JSON} in {workdir!r}: is it a `cnnlab sweep` workdir?")
    with open(path) as f:
        info = json.load(f)
    url = storage or info.get("storage") or study_lib.default_storage(workdir)
    if "***" in url:
        raise ValueError(f"The sweep's storage URL has a password; pass it with --storage ({url}).")
    study = load_optuna().load_study(study_name=study_name or info.get("study_name", study_lib.DEFAULT_STUDY),
                                     storage=url)
    return info, study


def _rows(info: dict[str, Any], study) -> list[dict[str, Any]]:
    """One row per slot: its latest real trial (duplicates dropped, interrupted tries counted)."""
    by_slot = study_lib.trials_by_slot(study)
    metric = info["sweep"]["metric"]
    recorded = selection_metrics(ml_collections.ConfigDict(
        {"metrics": info["base_config"].get("metrics", DEFAULT_METRICS)}))
    rows = []
    for slot, trials in sorted(by_slot.items()):
        t = max(trials, key=lambda u: u.number)
        attrs = t.user_attrs
        metrics = attrs.get(study_lib.METRICS, {})
        value = t.value if t.value is not None else metrics.get(metric)
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        values = attrs.get(study_lib.VALUES) or {}
        folds = attrs.get(study_lib.FOLD_VALUES)
        rows.append({
            "trial": t.number, "slot": slot, "state": t.state.name, metric: value,
            **({f"{metric} sd over folds": statistics.stdev(folds),
                "folds": " ".join(f"{v:.4g}" for v in folds)} if folds else {}),
            **{f: values.get(f, t.params.get(f)) for f in info["fields"]},
            **{m: metrics[m] for m in recorded if m != metric and m in metrics},
            "epochs": len(t.intermediate_values),
            "pack": attrs.get(study_lib.PACKED), "duration_s": attrs.get(study_lib.DURATION),
            "retries": len(trials) - 1, "error": attrs.get(study_lib.ERROR, ""),
            "workdir": attrs.get(study_lib.WORKDIR, ""),
            "_curve": dict(sorted(t.intermediate_values.items())), "_values": values,
        })
    sign = -1 if info["sweep"]["mode"] == "max" else 1

    def key(r):
        v = r[metric]
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (r["state"] != "COMPLETE", not ok, sign * v if ok else 0.0, r["slot"])

    return sorted(rows, key=key)


def format_values(values: dict[str, Any]) -> str:
    """A trial's swept values as one short label: ``learning_rate=0.003, seed=1`` (the last part
    of each dotted name, all of it after ``model.kwargs.``)."""
    def short(k: str) -> str:
        return k.split(".")[-1] if not k.startswith("model.kwargs") else k.split(".", 2)[-1]

    return ", ".join(f"{short(k)}={v:.3g}" if isinstance(v, float) else f"{short(k)}={v}"
                     for k, v in values.items())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return "" if v is None else str(v)


def _write_tables(workdir: str, rows, info, importances, note: str) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
    with open(os.path.join(workdir, "trials.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])
    shown = [c for c in cols if c != "workdir"]
    lines = [f"# Sweep {workdir}", "",
             f"{info['sweep']['sampler']} sweep, {len(rows)} trials, sorted by "
             f"`{info['sweep']['metric']}` ({info['sweep']['mode']})"
             + (f", each trial's the mean over {info['sweep']['folds']} validation folds"
                if info["sweep"].get("folds") else "") + ".", "",
             "| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
    for r in rows:
        cells = [_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ")[:80] for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Parameter importances", ""]
    if importances:
        lines += [f"- `{k}`: {v:.3f}" for k, v in importances.items()]
    else:
        lines.append(f"Not available: {note}")
    text = "\n".join(lines) + "\n"
    write_text_atomic(os.path.join(workdir, "trials.md"), text)
    return text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_params(path: str, rows, info) -> None:
    plt = _pyplot()
    metric, fields = info["sweep"]["metric"], info["fields"]
    space = info["sweep"].get("space", {})
    points = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and isinstance(r[metric], (int, float))]
    n = max(len(fields), 1)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, field in zip(axes.flat, fields):
        xs = [r[field] for r in points]
        if xs and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            spec = space.get(field, {})
            if spec.get("type") == "LogUniform" or spec.get("log") or (min(xs) > 0 and max(xs) / min(xs) >= 100):
                ax.set_xscale("log")
            pos = xs
            grid = sorted(set(xs))
            if len(grid) <= 8:  # a grid's values as the ticks (no fractional seeds)
                ax.set_xticks(grid, [_fmt(x) for x in grid], fontsize=8)
                ax.minorticks_off()
        else:
            labels = list(dict.fromkeys(_fmt(x) for x in xs))
            pos = [labels.index(_fmt(x)) for x in xs]
            ax.set_xticks(range(len(labels)), [lab[:18] for lab in labels], rotation=30, ha="right",
                          fontsize=8)
        for x, r in zip(pos, points):
            ax.scatter([x], [r[metric]], s=36, facecolors="none" if r["state"] == "PRUNED" else "C0",
                       edgecolors="C0")
            others = {k: v for k, v in r["_values"].items() if k != field}
            if others and len(points) <= 12:
                ax.annotate(format_values(others), (x, r[metric]), xytext=(5, 3), textcoords="offset points",
                            fontsize=7, color="0.3")
                ax.margins(x=0.35)  # room for the labels of the rightmost points
        ax.set_xlabel(field, fontsize=9)
        ax.set_ylabel(metric, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    fig.suptitle(f"{metric} of each trial against each swept field", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(row: dict[str, Any], metric: str) -> tuple[list[int], list[float]]:
    path = os.path.join(row["workdir"], runfiles.METRICS) if row["workdir"] else ""
    records = [r for r in read_metrics(path) if r.get("kind") == "epoch" and metric in r] if path else []
    if records:
        return [r["epoch"] for r in records], [r[metric] for r in records]
    curve = row["_curve"]
    return list(curve), list(curve.values())


def _plot_curves(path: str, rows, info, best) -> None:
    plt = _pyplot()
    metric = info["sweep"]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        xs, ys = _curve(r, metric)
        if not xs:
            continue
        is_best = r is best
        ax.plot(xs, ys, lw=2.6 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                ls="--" if r["state"] == "PRUNED" else "-",
                label=f"{format_values(r['_values']) or 'base config'} (trial {r['trial']}"
                      + (", best)" if is_best else ", pruned)" if r["state"] == "PRUNED" else ")"))
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, one line per trial")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if 0 < len(rows) <= 16:
        ax.legend(fontsize=7, ncol=1 if len(rows) <= 8 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _importances(study) -> tuple[dict[str, float], str]:
    optuna = load_optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, "fewer than 2 completed trials."
    try:
        return dict(optuna.importance.get_param_importances(study)), ""
    except Exception as e:  # noqa: BLE001 - importances are a bonus; say why they are missing
        return {}, f"{type(e).__name__}: {e}"


def write_report(workdir: str, *, storage: str | None = None, study_name: str | None = None) -> dict[str, Any]:
    """Writes the sweep report files in ``workdir`` (see the module docstring); returns the
    summary (``best``, ``counts``, ``files``) and prints the table."""
    info, study = _load(workdir, storage, study_name)
    rows = _rows(info, study)
    best = rows[0] if rows and rows[0]["state"] == "COMPLETE" else None
    importances, note = _importances(study)
    metric = info["sweep"]["metric"]
    files = ["trials.csv", "trials.md", "params.png", "curves.png", "summary.json"]
    text = _write_tables(workdir, rows, info, importances, note)
    if importances:
        write_json_atomic(os.path.join(workdir, "importances.json"), importances)
        files.append("importances.json")
    if rows:
        _plot_params(os.path.join(workdir, "params.png"), rows, info)
        _plot_curves(os.path.join(workdir, "curves.png"), rows, info, best)
    counts = dict(collections.Counter(r["state"] for r in rows))
    summary: dict[str, Any] = {"metric": metric, "mode": info["sweep"]["mode"], "counts": counts,
                               "num_trials": info["sweep"]["num_trials"], "best": None}
    best_path = os.path.join(workdir, "best_config.py")
    if best is not None:
        config = apply_point(ml_collections.ConfigDict(info["base_config"]), best["_values"])
        config.progress = True
        write_config_file(config, best_path, docstring=(
            f"Best trial {best['trial']} (slot {best['slot']}) of the sweep in {workdir}: "
            f"{metric}={best[metric]:.4f}.\n\n    cnnlab train --config={best_path} "
            f"--workdir={os.path.join(workdir, 'best')}"))
        files.append("best_config.py")
        summary["best"] = {"trial": best["trial"], "slot": best["slot"], "value": best[metric],
                           "values": best["_values"], "workdir": best["workdir"]}
    summary["files"] = files
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    print(text if len(rows) <= 40 else "\n".join(text.splitlines()[:46]) + "\n...", flush=True)
    if best is not None:
        print(f"Best: trial {best['trial']} {metric}={best[metric]:.4f}; config in {best_path}", flush=True)
    print(f"Report written to {workdir}: {', '.join(files)}.", flush=True)
    return summary
