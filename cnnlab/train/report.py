"""What a finished run leaves for a person: curves, a confusion matrix, a classification report.

``plot.png`` (loss and accuracy per epoch, train, val and test, as the tutorial's),
``confusion_matrix.png`` (counts and row-normalized), and ``classification_report.txt``/``.json`` with precision, recall,
F1 and support per class (scikit-learn's layout), all regenerated from the files the run
wrote (``metrics.jsonl``, ``confusion_last.npy``), so ``cnnlab report`` can redo them (where
they exist, only with ``--overwrite``: :func:`refuse_existing`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from cnnlab import runfiles
from cnnlab.train.writers import read_metrics, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def classification_report(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-class precision/recall/F1/support from a ``[true, predicted]`` confusion matrix,
    plus accuracy, macro and weighted averages (as ``sklearn.metrics.classification_report``)."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    report = {
        name: {"precision": p, "recall": r, "f1-score": f, "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    }
    total = support.sum()
    report["accuracy"] = float(tp.sum() / total) if total else 0.0
    scores = {"precision": precision, "recall": recall, "f1-score": f1}
    w = support / total if total else support
    report["macro avg"] = {**{k: float(v.mean()) for k, v in scores.items()}, "support": int(total)}
    report["weighted avg"] = {**{k: float((v * w).sum()) for k, v in scores.items()}, "support": int(total)}
    return json.loads(json.dumps(report, default=float))


def format_report(report: dict, class_names: Sequence[str]) -> str:
    """Renders :func:`classification_report` as scikit-learn's text table."""
    width = max([len(n) for n in class_names] + [len("weighted avg")])
    head = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"

    def row(name: str) -> str:
        r = report[name]
        return f"{name:>{width}}  {r['precision']:9.4f}  {r['recall']:9.4f}  {r['f1-score']:9.4f}  {r['support']:9d}"

    total = report["macro avg"]["support"]
    accuracy = f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {report['accuracy']:9.4f}  {total:9d}"
    lines = [head, "", *map(row, class_names), "", accuracy, row("macro avg"), row("weighted avg")]
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], path: str) -> Figure:
    """Loss and accuracy per epoch (integer ticks): train (the epoch's running mean over its
    augmented batches) and each evaluated split (val, test) at the epoch's end. Returns the
    (closed) figure."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["epoch"] for r in epochs]
    marker = "o" if len(x) <= 30 else None
    for split, style, label in (("train", "-", "train (epoch mean)"), ("val", "--", "val"),
                                ("test", ":", "test")):
        if any(f"{split}/loss" in r for r in epochs):
            for ax, m in zip(axes, ("loss", "accuracy")):
                ax.plot(x, [r.get(f"{split}/{m}", np.nan) for r in epochs], style, marker=marker, ms=4,
                        label=label)
    for ax, m in zip(axes, ("loss", "accuracy")):
        ax.set(xlabel="epoch", ylabel=m, title=m.capitalize())
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1.02)
    _save_figure(fig, path)
    return fig


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str, *, split: str = "test",
                   checkpoint: str = "latest") -> Figure:
    """The ``[true, predicted]`` confusion matrix of ``split`` at ``checkpoint``, in two panels:
    counts, and row-normalized (each true class's fractions, so the diagonal is its recall).
    Cells hold their values up to 30 classes, class names label the axes up to 120. Returns
    the (closed) figure."""
    confusion = np.asarray(confusion, np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    n = len(class_names)
    size = float(np.clip(0.14 * n + 3, 4.5, 18))
    fig, axes = _pyplot().subplots(1, 2, figsize=(2 * size + 1.5, size + 0.6))
    fig.suptitle(f"Confusion matrix: {split} split, {checkpoint} checkpoint "
                 f"({int(confusion.sum())} images, {n} classes)")
    panels = ((confusion, "Counts (images)", confusion.max() or 1),
              (100 * norm, "Row-normalized (% of each true class)", 100))
    for ax, (values, title, vmax) in zip(axes, panels):
        im = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        if n <= 120:
            font = 8 if n <= 30 else 5
            ax.set_xticks(range(n), class_names, rotation=90, fontsize=font)
            ax.set_yticks(range(n), class_names, fontsize=font)
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    if values[i, j]:  # zeros left blank: the colour says it
                        ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center",
                                fontsize=max(5, 9 - n // 8), color="white" if values[i, j] > 0.5 * vmax else "black")
        fig.colorbar(im, ax=ax, fraction=0.046).locator = _pyplot().MaxNLocator(integer=True)
    _save_figure(fig, path)
    return fig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str) -> None:
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    _pyplot().close(fig)


class OutputExistsError(FileExistsError):
    """A file ``cnnlab eval``/``report`` would write exists already, and overwriting it was not
    asked for: a run's records are never replaced unasked."""


def refuse_existing(target: str, names: Sequence[str], *, overwrite: bool = False) -> None:
    """Raises :class:`OutputExistsError` naming the files of ``names`` that exist in ``target``,
    unless ``overwrite``. Called before any work, so a refused command writes nothing."""
    existing = [n for n in names if os.path.lexists(os.path.join(target, n))]
    if overwrite or not existing:
        return
    more = f" (and {', '.join(existing[1:])})" if len(existing) > 1 else ""
    raise OutputExistsError(
        f"{os.path.join(target, existing[0])} exists{more}, and records are not overwritten "
        "unless asked: --overwrite replaces them, --output_dir=DIR writes them elsewhere")


def output_dir_for(workdir: str, output_dir: str | None = None) -> str | None:
    """Where a run's derived files go: ``output_dir`` (created) when given, else ``workdir``, or
    None (with a note on stderr) when ``workdir`` is not writable, e.g. a read-only copy."""
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        return output_dir
    if os.access(workdir, os.W_OK):
        return workdir
    print(f"note: {workdir} is not writable, so nothing is written there "
          "(--output_dir=DIR writes the files elsewhere).", file=sys.stderr)
    return None


def write_reports(workdir: str, class_names: Sequence[str] | None = None, *,
                  output_dir: str | None = None, overwrite: bool = False) -> dict:
    """(Re)generates every report of ``workdir`` into ``output_dir`` (see :func:`output_dir_for`:
    default ``workdir``, nothing written when that is read-only); returns the classification
    report. Raises :class:`OutputExistsError`, writing nothing, when one of the files exists
    there, unless ``overwrite`` (as the trainer refreshes its own run's reports)."""
    if class_names is None:
        with open(os.path.join(workdir, runfiles.CLASSES)) as f:
            class_names = json.load(f)
    target = output_dir_for(workdir, output_dir)
    records = read_metrics(os.path.join(workdir, runfiles.METRICS))
    confusion_path = os.path.join(workdir, runfiles.CONFUSION_LAST)
    if target is not None:
        names = ([runfiles.PLOT] if records else []) + ([
            runfiles.REPORT_JSON, runfiles.REPORT_TEXT, runfiles.CONFUSION_PLOT]
            if os.path.exists(confusion_path) else [])
        refuse_existing(target, names, overwrite=overwrite)
    if records and target is not None:
        plot_curves(records, os.path.join(target, runfiles.PLOT))
    if not os.path.exists(confusion_path):
        return {}
    confusion = np.load(confusion_path)
    report = classification_report(confusion, class_names)
    if target is not None:
        write_json_atomic(os.path.join(target, runfiles.REPORT_JSON), report)
        write_text_atomic(os.path.join(target, runfiles.REPORT_TEXT), format_report(report, class_names))
        plot_confusion(confusion, class_names, os.path.join(target, runfiles.CONFUSION_PLOT))
    return report
