"""A stage's report history: every report a worker makes is kept (in the training progress, so checkpoints
carry it and a resumed stage keeps the curves of its earlier steps), thinned to a bounded size."""

from __future__ import annotations

from typing import Any

from rmoe_platform.stage.worker.checkpoints import TrainProgress

HISTORY_LIMIT = 500  # records of a stage's history in its results row (paper-scale runs stay small)
_NOT_IN_HISTORY = (
    "history",
    "final",
    "world_size",
    "resumed_from_step",
    "attempts",
    "precision",
    "device_model",
    "predictions_exported",
)


def record_history(progress: TrainProgress, metrics: dict[str, Any], *, final: bool) -> None:
    """Append this report to the history (kept in the progress, so checkpoints carry it). Long runs thin
    it to 2x HISTORY_LIMIT whenever it reaches 4x, and to HISTORY_LIMIT at the end: thinning a dense
    history once at the end keeps the spacing even, where thinning often to the final size would not."""
    record = {k: v for k, v in metrics.items() if k not in _NOT_IN_HISTORY and not k.startswith("initial/")}
    progress.history.append(record)
    if final:
        progress.history = thin_history(progress.history, HISTORY_LIMIT)
    elif len(progress.history) > 4 * HISTORY_LIMIT:
        progress.history = thin_history(progress.history, 2 * HISTORY_LIMIT)


def thin_history(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` records spread evenly over steps, first and last kept. Evaluated records (val_*)
    and the others are thinned apart (evaluated ones get up to half) so val curves keep their points;
    choosing by step, not by index, keeps a re-thinned history even."""
    if len(records) <= limit:
        return list(records)
    evaluated = [i for i, r in enumerate(records) if any(k.startswith("val_") for k in r)]
    others = [i for i, r in enumerate(records) if not any(k.startswith("val_") for k in r)]
    eval_budget = min(len(evaluated), limit // 2)
    keep = _evenly_by_step(records, evaluated, eval_budget) + _evenly_by_step(records, others, limit - eval_budget)
    return [records[i] for i in sorted(set(keep))]


def _evenly_by_step(records: list[dict[str, Any]], indices: list[int], count: int) -> list[int]:
    """Of `indices` (ascending steps), the ones nearest to `count` evenly spaced steps, ends included."""
    if len(indices) <= count:
        return list(indices)
    if count <= 1:
        return indices[-count:] if count else []
    steps = [float(records[i].get("step", i)) for i in indices]
    chosen, j = [], 0
    for t in range(count):
        target = steps[0] + (steps[-1] - steps[0]) * t / (count - 1)
        while j + 1 < len(steps) and abs(steps[j + 1] - target) <= abs(steps[j] - target):
            j += 1
        chosen.append(indices[j])
    return chosen
