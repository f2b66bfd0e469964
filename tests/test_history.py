"""A stage's training history: what each report records, how long runs are thinned, and that the
history travels in the training checkpoint's progress (so a resumed stage keeps its earlier curves)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from rmoe_platform.stage.worker.checkpoints import TrainProgress
from rmoe_platform.stage.worker.history import HISTORY_LIMIT, record_history, thin_history


def _report(step: int, evaluate: bool = False) -> dict:
    metrics = {"step": step, "loss": 1 / step, "final": False, "world_size": 2, "resumed_from_step": -1}
    metrics["initial/val_loss"] = 3.0
    if evaluate:
        metrics["val_accuracy"] = step / 1e4
    return metrics


def test_records_leave_out_bookkeeping_keys() -> None:
    progress = TrainProgress()
    record_history(progress, _report(1, evaluate=True), final=False)
    assert progress.history == [{"step": 1, "loss": 1.0, "val_accuracy": 1e-4}]


def test_long_runs_are_thinned_evenly_keeping_ends_and_evaluations() -> None:
    progress = TrainProgress()
    steps = 5000
    for step in range(1, steps + 1):
        record_history(progress, _report(step, evaluate=step % 100 == 0), final=step == steps)
        assert len(progress.history) <= 4 * HISTORY_LIMIT + 1
    history = progress.history
    assert len(history) <= HISTORY_LIMIT and history[0]["step"] == 1 and history[-1]["step"] == steps
    assert sum("val_accuracy" in r for r in history) == steps // 100, "every evaluation kept (fewer than half)"
    gaps = np.diff([r["step"] for r in history if "val_accuracy" not in r])
    assert gaps.max() <= 2 * gaps.mean(), "evenly spread over steps"


def test_thin_history_is_identity_below_the_limit() -> None:
    records = [{"step": i} for i in range(10)]
    assert thin_history(records, 10) == records
    assert [r["step"] for r in thin_history(records, 3)] == [0, 5, 9]  # a tie goes to the later report


def test_history_round_trips_through_the_checkpoint_state() -> None:
    progress = TrainProgress(step=4, epoch=1, samples=64, history=[{"step": 2, "loss": 0.5}])
    state = json.loads(json.dumps({"progress": asdict(progress)}))  # as save/restore_training_state do
    assert TrainProgress(**state["progress"]) == progress
    assert TrainProgress(**{"step": 4, "epoch": 1, "samples": 64}).history == [], "older checkpoints resume"
