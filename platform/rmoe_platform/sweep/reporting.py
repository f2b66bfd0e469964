"""What a sweep trial tells Ray Tune: the result fields ASHA and the searchers read, and the callback that
turns a stage's validations into Tune results.

Kept apart from `trial` on purpose: `EvaluationReporter` runs in Ray Train's controller, which unpickles it
(importing this module) before it starts any worker, so this module imports nothing heavier than Ray Tune and
the cost arithmetic; `trial` imports the whole runner (torch, timm, `rmoe`), seconds of every fit's start.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from rmoe_platform.cost.ledger import COMPUTE_PARTS, LEDGER_PREFIX
from rmoe_platform.pipelines.accounting import Cost

METRIC = "val_metric"  # what ASHA and the searchers optimise (higher is better: accuracy, mIoU, AP)
TIME_ATTR = "evaluations"  # the downstream stage's validations so far (ASHA's rung unit)
DONE = "pipeline_status"  # in a trial's last report only once its pipeline row is written
PRIOR_COST_PREFIX = "prior_"  # what the trial's finished stages cost, in each evaluation's result


class EvaluationReporter(TuneReportCallback):
    """Runs on the Train controller: each report that carries a validation (but the stage's last one)
    becomes one Tune result, with what the trial's finished stages cost so far (a stopped trial's row is
    written from it). A trial whose training is over is thus never marked stopped by ASHA."""

    def __init__(self, stage: str, prior: Cost, num_workers: int) -> None:
        super().__init__()
        self._stage = stage
        self._prior = prior
        self._num_workers = num_workers
        self._evaluations = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        latest = metrics[0]
        if METRIC not in latest or latest.get("final"):
            return  # the stage's last validation arrives with the trial's own final result, which ASHA skips
        self._evaluations += 1
        self._training_actor_item_queue.put(
            {
                METRIC: float(latest[METRIC]),
                TIME_ATTR: self._evaluations,
                "stage": self._stage,
                "step": latest.get("step"),
                **self._prior.as_fields(PRIOR_COST_PREFIX),
                "stage_device_seconds": compute_seconds(latest) * self._num_workers,
            }
        )


def compute_seconds(metrics: dict[str, Any]) -> float:
    """A report's training + evaluation time so far (the compared cost of the stage it is in)."""
    return sum(float(metrics.get(f"{LEDGER_PREFIX}{part}", 0.0)) for part in COMPUTE_PARTS)
