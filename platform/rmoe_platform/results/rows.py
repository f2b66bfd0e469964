"""Results rows, built in one place: a stage run, a pipeline's summary, and a sweep trial ASHA stopped
(whose own process is gone, so the sweep driver writes it). Costs come from the cost accounting
(`pipelines.accounting`), never from arithmetic of their own; `row_cost` reads a row's cost back."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmoe_platform.cost.devices import DEVICES, DeviceSpec
from rmoe_platform.pipelines.accounting import SECONDS_PER_DAY, Cost, stage_cost

if TYPE_CHECKING:
    from rmoe_platform.config.experiment import ExperimentConfig
    from rmoe_platform.pipelines.outcomes import PipelineSummary, StageOutcome
    from rmoe_platform.stage.run import StageResult


@dataclass(frozen=True)
class RowContext:
    """What every row of one run shares: the experiment, its seed, the code that ran it, its device table
    (a stage's measured utilisation is against the peaks it states) and, for a sweep trial, the sweep and
    the sampled setting."""

    experiment: str
    arch: str
    git_commit: str | None
    seed: int | None = None
    devices: Mapping[str, DeviceSpec] = field(default_factory=lambda: dict(DEVICES))  # the experiment's table
    sweep_id: str | None = None
    params: dict[str, Any] | None = None

    def common(self) -> dict[str, Any]:
        common = {"experiment": self.experiment, "git_commit": self.git_commit, "arch": self.arch, "seed": self.seed}
        if self.sweep_id is not None:
            common.update({"sweep_id": self.sweep_id, "params": self.params or None})
        return common


def stage_row(
    ctx: RowContext,
    outcome: StageOutcome,
    result: StageResult | None,
    *,
    pipelines: list[str],
    parent: StageOutcome | None,
    shared: bool,
    started: dt.datetime,
    trace: str | None,
) -> dict[str, Any]:
    """The row of one stage run (succeeded or failed; `trace` is a failure's traceback). A trained stage's
    times are those its cost ledger charges; else `started` and now."""
    node, config = outcome.node, outcome.node.config
    finished = now()
    if result is not None:
        started, finished = (dt.datetime.fromtimestamp(t, dt.UTC) for t in result.window)
    moe = config.model.moe
    metrics = result.metrics if result else {}
    core = node.imported
    return {
        **ctx.common(),
        "task": config.task,
        "row_type": "stage",
        "pipeline": ",".join(pipelines),
        "stage": node.key,
        "stage_kind": node.kind,
        "run_id": outcome.run_id,
        "parent_run_id": parent.run_id if parent else None,
        "config_hash": node.config_hash,
        "parent_hash": node.parent.config_hash if node.parent else None,
        "shared": shared,
        "imported": core is not None,
        "head_reinitialized": core.head_reinitialized if core else (result.head_reinitialized if result else None),
        "cached": False,
        "status": outcome.status,
        "attempts": int(metrics["attempts"]) if "attempts" in metrics else None,
        "error": None if trace is None else f"{outcome.error}\n{trace}",
        "num_experts": moe.num_experts if moe else None,
        "top_k": moe.top_k if moe else None,
        "moe_layers": json.dumps(config.model.moe_layers) if moe else None,
        "residual_rank": moe.residual_rank if moe else None,
        "budget_steps": None if core else result.total_steps if result else config.budget.steps,
        "budget_epochs": None if core else config.budget.epochs,
        "metric_name": node.metric_name,
        "metric": outcome.metric,
        "metrics": {k: v for k, v in metrics.items() if k.startswith(("val_", "loss/", "initial/"))},
        "val_loss": metrics.get("val_loss"),
        "train_loss": metrics.get("task_loss"),
        **_cost_columns(outcome.cost),
        "device_kind": config.scaling.device_kind,
        "num_workers": config.scaling.num_workers,
        "wall_seconds": result.cost.wall_seconds if result else None,
        "achieved_flops_per_second": result.cost.achieved_flops_per_second if result else None,
        "mfu": result.cost.mfu(ctx.devices) if result else None,
        "device_model": result.cost.device_model if result else None,
        "ledger": result.cost.ledger.as_row() if result else None,
        "telemetry": {k: v for k, v in metrics.items() if k.startswith("moe/") or k == "precision"},
        "history": metrics.get("history"),
        "config": {"imported": core.describe(), "model": config.to_dict()["model"]} if core else config.to_dict(),
        "checkpoint_uri": outcome.checkpoint_uri,
        "predictions_uri": result.predictions_uri if result else None,
        "started_at": started,
        "finished_at": finished,
    }


def pipeline_row(
    ctx: RowContext, exp: ExperimentConfig, summary: PipelineSummary, *, run_id: str, dense: PipelineSummary | None
) -> dict[str, Any]:
    """A pipeline's summary: its downstream metric, its total cost (shared stages charged in full) and its
    marginal cost over the dense pipeline."""
    cost = summary.cost
    marginal = cost - dense.cost if dense is not None and dense.ok else None
    stages = [
        {
            "stage": s.node.key,
            "run_id": s.run_id,
            "status": s.status,
            "shared": s.node.key in summary.shared,
            "imported": s.node.imported is not None,
            "flops": s.cost.flops,
            "device_seconds": s.cost.device_seconds,
            "overhead_device_seconds": s.cost.overhead_device_seconds,
            "dollars": s.cost.dollars,
        }
        for s in summary.stages
    ]
    last = summary.stages[-1]
    moe = summary.pipeline != "dense"
    return {
        **ctx.common(),
        "task": exp.downstream.task,
        "row_type": "pipeline",
        "pipeline": summary.pipeline,
        "stage": last.node.key,
        "run_id": run_id,
        "parent_run_id": last.run_id,
        "status": "succeeded" if summary.ok else "failed",
        "imported": summary.imported is not None,
        "error": "; ".join(f"{s.node.key}: {s.error}" for s in summary.stages if s.error) or None,
        "metric_name": exp.metric_name,
        "metric": summary.metric,
        **_cost_columns(cost),
        "marginal_flops": marginal.flops if marginal else None,
        "marginal_device_seconds": marginal.device_seconds if marginal else None,
        "marginal_dollars": marginal.dollars if marginal else None,
        "num_experts": exp.moe.num_experts if moe else None,
        "top_k": exp.moe.top_k if moe else None,
        "config": {"stages": stages, "experiment": exp.to_dict()},
        "checkpoint_uri": last.checkpoint_uri,
        "finished_at": now(),
    }


def stopped_trial_row(
    ctx: RowContext,
    exp: ExperimentConfig,
    *,
    run_id: str,
    stage: str,
    evaluations: int,
    metric: float | None,
    prior: Cost,
    stage_device_seconds: float,
) -> dict[str, Any]:
    """The pipeline row of a sweep trial ASHA stopped in `stage` after `evaluations` validations: its metric
    at the stop, and the cost of its finished stages (`prior`) plus the device time of the stage it was in
    (that stage's FLOPs are not counted: it did not finish)."""
    device_kind = (exp.moe_scaling or exp.scaling).device_kind
    cost = prior + stage_cost(0.0, stage_device_seconds, device_kind, exp.prices)
    return {
        **ctx.common(),
        "row_type": "pipeline",
        "pipeline": ",".join(exp.pipelines),
        "task": exp.downstream.task,
        "stage": stage,
        "run_id": run_id,
        "status": "stopped",
        "error": f"stopped early by ASHA after {evaluations} evaluation(s) of {stage}",
        "metric_name": exp.metric_name,
        "metric": metric,
        **_cost_columns(cost),
        "finished_at": now(),
    }


def row_cost(row: dict[str, Any]) -> Cost:
    """The cost a row records (the inverse of what the builders above write)."""
    return Cost(
        flops=row["flops"] or 0.0,
        device_seconds=row["device_seconds"] or 0.0,
        gpu_seconds=(row["gpu_days"] or 0.0) * SECONDS_PER_DAY,
        dollars=row["dollars"] or 0.0,
        overhead_device_seconds=row.get("overhead_device_seconds") or 0.0,
    )


def _cost_columns(cost: Cost) -> dict[str, float]:
    return {
        "flops": cost.flops,
        "device_seconds": cost.device_seconds,
        "gpu_days": cost.gpu_days,
        "dollars": cost.dollars,
        "overhead_device_seconds": cost.overhead_device_seconds,
    }


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def git_commit() -> str | None:
    """The commit of the code writing the rows (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
