"""One sweep trial (the Ray Tune function, the driver-function pattern of Ray Train V2): run the swept
pipeline for one setting through the experiment runner, its shared stages found in the stage cache, and
forward each downstream evaluation to Tune so ASHA can stop a poor trial early."""

from __future__ import annotations

from typing import Any

from ray import tune

from rmoe_platform.pipelines.accounting import Cost
from rmoe_platform.pipelines.graph import StageNode
from rmoe_platform.pipelines.outcomes import SweepTrial
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.sweep.plan import SweepPlan
from rmoe_platform.sweep.reporting import DONE, METRIC, EvaluationReporter


def run_trial(config: dict[str, Any], plan: SweepPlan) -> None:
    """Tune's trial function. A setting whose pipeline row is already in the store (a resumed sweep) is
    reported from there and not trained again."""
    spec = plan.trial(config)
    exp = spec.experiment
    store = ResultsStore(exp.results, s3=plan.access)
    trial = SweepTrial(plan.sweep_id, spec.key, spec.params, plan.shared_stages)
    done = finished_row(store, trial.run_id)
    if done is not None:
        tune.report(final_result(done))
        return
    last_stage = None

    def callbacks(node: StageNode, prior: Cost) -> list[Any]:
        if node.key != last_stage:
            return []
        return [EvaluationReporter(node.key, prior, node.config.scaling.num_workers)]

    runner = ExperimentRunner(exp, store, s3=plan.access, log=lambda _: None, trial=trial, stage_callbacks=callbacks)
    plans = runner.validate()
    last_stage = plans[plan.sweep.pipeline][-1].key
    runner.run()
    row = finished_row(store, trial.run_id)
    if row is None:
        raise RuntimeError(f"sweep {plan.sweep_id}: trial {spec.key} finished without its pipeline row")
    tune.report(final_result(row))


def finished_row(store: ResultsStore, run_id: str) -> dict[str, Any] | None:
    """The trial's pipeline row (succeeded, failed or stopped), if one was written."""
    rows = [r for r in store.rows(row_type="pipeline", run_id=run_id)]
    return rows[-1] if rows else None


def final_result(row: dict[str, Any]) -> dict[str, Any]:
    """The trial's last Tune result. It has no TIME_ATTR, so ASHA does not rank it again."""
    metric = row.get("metric")
    return {
        METRIC: float("nan") if metric is None else float(metric),
        DONE: row["status"],
        "dollars": row.get("dollars"),
        "device_seconds": row.get("device_seconds"),
        "gpu_days": row.get("gpu_days"),
        "flops": row.get("flops"),
    }
