"""Orbax checkpoints: the latest N for resume, and the best by a metric.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves nothing a later run would trust. ``latest/`` keeps the most recent
``keep`` states; ``best/`` keeps the single best state by ``best_metric``.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from cnnlab import runfiles


def _manager(directory: str, **options: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True, **options
        ),
    )


class Checkpoints:
    """The run's two checkpoint managers under ``workdir``."""

    def __init__(self, workdir: str, *, keep: int, best_metric: str, best_mode: str) -> None:
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.latest = _manager(os.path.join(workdir, runfiles.CHECKPOINTS, runfiles.LATEST), max_to_keep=keep)
        self.best = _manager(
            os.path.join(workdir, runfiles.CHECKPOINTS, runfiles.BEST),
            max_to_keep=1,
            best_fn=lambda metrics: float(metrics[best_metric]),
            best_mode=best_mode,
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save_latest(self, step: int, state: Any) -> None:
        if self.latest.latest_step() == step:
            return
        self.latest.save(step, args=ocp.args.StandardSave(state))
        self.latest.wait_until_finished()

    def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> None:
        """Saves ``state`` as the best when ``metrics[best_metric]`` beats the kept best (ties
        keep the earlier one); otherwise writes nothing."""
        if self.best_metric not in metrics or self.best.latest_step() == step:
            return
        kept = self.best.best_step()
        if kept is not None:
            old = (self.best.metrics(kept) or {}).get(self.best_metric)
            new = float(metrics[self.best_metric])
            if old is not None and not (new > old if self.best_mode == "max" else new < old):
                return
        self.best.save(
            step, args=ocp.args.StandardSave(state), metrics={self.best_metric: metrics[self.best_metric]}
        )
        self.best.wait_until_finished()

    def restore(self, target: Any, *, which: str = "latest", step: int | None = None) -> tuple[Any, int]:
        """Restores into the structure (and shardings) of ``target``; returns ``(state, step)``."""
        manager = self.latest if which == "latest" else self.best
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"No {which} checkpoint in {manager.directory}.")
        return manager.restore(step, args=ocp.args.StandardRestore(target)), step

    def restore_variables(self, target: Any, *, which: str = "best") -> tuple[Any, int, str]:
        """Only the model's weights: ``target`` is ``{"params", "batch_stats"}`` (shapes and
        shardings), restored from the ``best`` checkpoint (the ``latest`` when there is no best)
        or the ``latest``; returns ``(variables, step, which)``. The optimizer state is left
        out: its structure would need the training config and data."""
        if which == "best" and self.best.latest_step() is None:
            which = "latest"
        manager = self.best if which == "best" else self.latest
        step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
        variables = manager.restore(step, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
        return variables, int(step), which

    def close(self) -> None:
        self.latest.close()
        self.best.close()
