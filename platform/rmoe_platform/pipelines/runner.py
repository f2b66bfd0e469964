"""Run an experiment's pipelines: each stage once (cached by content hash in the results store), rows
written as stages finish, a summary row per pipeline, and a report with the paper's comparison."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rmoe_platform import storage
from rmoe_platform.pipelines.accounting import SECONDS_PER_DAY, Cost, stage_cost, total
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.datasets.checks import DatasetCheck, check_dataset, ensure_dataset
from rmoe_platform.datasets.format import DatasetCard
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.names import METRIC_NAMES
from rmoe_platform.pipelines.graph import StageNode, plan_pipelines, shared_keys
from rmoe_platform.results import ResultsStore
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.stage.run import StageResult, run_stage


@dataclass
class StageOutcome:
    node: StageNode
    status: str  # succeeded | cached | failed | skipped
    run_id: str
    cost: Cost = field(default_factory=Cost)
    metric: float | None = None
    checkpoint_uri: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "cached")


@dataclass
class PipelineSummary:
    pipeline: str
    stages: list[StageOutcome]
    shared: set[str]

    @property
    def ok(self) -> bool:
        return all(stage.ok for stage in self.stages)

    @property
    def metric(self) -> float | None:
        return self.stages[-1].metric if self.ok else None

    @property
    def cost(self) -> Cost:
        return total(stage.cost for stage in self.stages)


@dataclass(frozen=True)
class SweepTrial:
    """Set when the runner runs one trial of a sweep: its rows carry the sweep id and the sampled setting,
    the stages every trial shares are marked shared, and the pipeline row's run id is the trial's own
    (stable across a resumed sweep, so a finished trial is recognised and never written twice)."""

    sweep_id: str
    trial_key: str
    params: dict[str, Any]
    shared_stages: frozenset[str] = frozenset()

    @property
    def run_id(self) -> str:
        return f"{self.sweep_id}-{self.trial_key}"


# Given a stage about to run and what its finished ancestors cost, the Ray Train callbacks to run it with.
StageCallbacks = Callable[[StageNode, Cost], list[Any]]


@dataclass
class ExperimentReport:
    experiment: str
    outcomes: dict[str, StageOutcome]
    summaries: dict[str, PipelineSummary]

    @property
    def ok(self) -> bool:
        return all(summary.ok for summary in self.summaries.values())


class ExperimentRunner:
    def __init__(
        self,
        exp: ExperimentConfig,
        store: ResultsStore,
        *,
        log: Callable[[str], None] = print,
        stage_runner: Callable[..., StageResult] = run_stage,
        s3: S3Access | None = None,
        trial: SweepTrial | None = None,
        stage_callbacks: StageCallbacks | None = None,
    ) -> None:
        self.exp = exp
        self.trial = trial
        self.stage_callbacks = stage_callbacks
        self.access = s3 or S3Access.resolve(exp.s3)
        self.store = store
        self.log = log
        self.stage_runner = stage_runner
        self.git_commit = _git_commit()
        self._succeeded: dict[str, list[dict[str, Any]]] = {}
        # validate()'s stage graph and dataset checks, reused by run()
        self._validated: tuple[dict[str, list[StageNode]], dict[str, DatasetCheck]] | None = None

    def validate(self) -> dict[str, list[StageNode]]:
        """What can fail before any stage runs (nothing is written): the stage graph, storage and results
        locations, and each dataset (present and valid, or generatable where it should be)."""
        try:
            plans = plan_pipelines(self.exp)
        except ValueError as err:
            raise ConfigError(str(err) if isinstance(err, ConfigError) else f"experiment: {err}") from None
        storage.check_writable(self.exp.storage, field="experiment.storage", s3=self.access)
        self.store.check_writable()
        datasets = {
            field_path: check_dataset(spec, self.access, field_path) for field_path, spec in self.exp.datasets().items()
        }
        self._validated = (plans, datasets)
        return plans

    @property
    def dataset_checks(self) -> dict[str, DatasetCheck]:
        """Each phase's dataset as `validate()` found it, keyed by config field."""
        if self._validated is None:
            self.validate()
        assert self._validated is not None
        return self._validated[1]

    def run(self) -> ExperimentReport:
        """Run every stage; validates first unless `validate()` already did (its checks are reused)."""
        plans, outcomes = self._run_nodes(None)
        shared = shared_keys(plans) | (self.trial.shared_stages if self.trial else frozenset())
        summaries = {p: PipelineSummary(p, [outcomes[s.key] for s in stages], shared) for p, stages in plans.items()}
        self.store.append(self._pipeline_rows(summaries))
        return ExperimentReport(self.exp.name, outcomes, summaries)

    def run_stages(self, keys: set[str]) -> dict[str, StageOutcome]:
        """Run only the stages named by `keys` (and their ancestors), writing stage rows but no pipeline
        rows: how a sweep trains the stages its trials share once, before the trials start."""
        return self._run_nodes(keys)[1]

    def _run_nodes(self, only: set[str] | None) -> tuple[dict[str, list[StageNode]], dict[str, StageOutcome]]:
        if self._validated is None:
            self.validate()
        assert self._validated is not None
        plans, datasets = self._validated
        for field_path, spec in self.exp.datasets().items():
            opened = ensure_dataset(spec, self.access, field_path, datasets[field_path])
            self.log(f"dataset {opened.card.name}: {opened.uri} ({_split_sizes(opened.card)})")
        self._succeeded = self._succeeded_stage_rows()
        shared = shared_keys(plans)
        users = {key: sorted(p for p, stages in plans.items() if any(s.key == key for s in stages)) for key in shared}
        wanted = None if only is None else {n.key for s in plans.values() for n in s if _leads_to(n, only, s)}
        outcomes: dict[str, StageOutcome] = {}
        for pipeline, stages in plans.items():
            for node in stages:
                if node.key not in outcomes and (wanted is None or node.key in wanted):
                    outcomes[node.key] = self._stage(node, outcomes, users.get(node.key, [pipeline]))
        return plans, outcomes

    # ---- stages --------------------------------------------------------------------------------
    def _stage(self, node: StageNode, outcomes: dict[str, StageOutcome], pipelines: list[str]) -> StageOutcome:
        parent = outcomes.get(node.parent.key) if node.parent else None
        if parent is not None and not parent.ok:
            self.log(f"[{node.key}] skipped: parent {parent.node.key} {parent.status}")
            return StageOutcome(node, "skipped", "", error=f"parent {parent.node.key} {parent.status}")
        cached = self._cached(node)
        if cached is not None:
            self.log(f"[{node.key}] cached (run {cached.run_id}, {_metric_name(node)} {_fmt(cached.metric)})")
            return cached
        config = node.config
        if parent is not None:
            config = replace(config, model=replace(config.model, parent_checkpoint=parent.checkpoint_uri))
        run_id = f"{node.key.replace('/', '-')}-{node.config_hash[:8]}-{uuid.uuid4().hex[:6]}"
        self.log(f"[{node.key}] running on {config.scaling.num_workers} worker(s) …")
        started = _now()
        extra: dict[str, Any] = {}
        if self.stage_callbacks is not None:
            ancestors = [outcomes[n.key] for n in node.lineage[:-1]]
            extra["callbacks"] = self.stage_callbacks(node, total(a.cost for a in ancestors))
        try:
            result = self.stage_runner(config, run_name=run_id, s3=self.access, **extra)
        except ConfigError:
            raise
        except Exception as err:  # a failed stage is recorded; the others go on
            outcome = StageOutcome(node, "failed", run_id, error=f"{type(err).__name__}: {err}")
            self.store.append([self._stage_row(outcome, None, pipelines, parent, started, traceback.format_exc())])
            self.log(f"[{node.key}] FAILED: {outcome.error}")
            return outcome
        cost = stage_cost(result.cost.train_flops, result.cost.device_seconds, result.cost.device_kind, self.exp.prices)
        outcome = StageOutcome(node, "succeeded", run_id, cost, result.metric, result.checkpoint_uri)
        self.store.append([self._stage_row(outcome, result, pipelines, parent, started, None)])
        self.log(
            f"[{node.key}] done in {result.cost.wall_seconds:.0f} s: {result.metric_name} {_fmt(outcome.metric)}, "
            f"{cost.flops:.3g} FLOPs, {cost.device_seconds:.0f} device-s"
        )
        return outcome

    def _succeeded_stage_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Succeeded stage runs by config hash, newest first (the store is read once per run)."""
        by_hash: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.read().table.to_pylist():
            if row["row_type"] == "stage" and row["status"] == "succeeded" and row["config_hash"]:
                by_hash.setdefault(row["config_hash"], []).append(row)
        oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
        for rows in by_hash.values():
            rows.sort(key=lambda r: r["finished_at"] or oldest, reverse=True)
        return by_hash

    def _cached(self, node: StageNode) -> StageOutcome | None:
        for row in self._succeeded.get(node.config_hash, []):
            uri = row["checkpoint_uri"]
            if uri and storage.exists(f"{uri.rstrip('/')}/model.safetensors", self.access):
                cost = Cost(
                    flops=row["flops"] or 0.0,
                    device_seconds=row["device_seconds"] or 0.0,
                    gpu_seconds=(row["gpu_days"] or 0.0) * SECONDS_PER_DAY,
                    dollars=row["dollars"] or 0.0,
                )
                return StageOutcome(node, "cached", row["run_id"], cost, row["metric"], uri)
        return None

    # ---- rows ----------------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        common = {"experiment": self.exp.name, "git_commit": self.git_commit, "arch": self.exp.arch}
        if self.trial is not None:
            common.update({"sweep_id": self.trial.sweep_id, "params": self.trial.params or None})
        return common

    def _stage_row(
        self,
        outcome: StageOutcome,
        result: StageResult | None,
        pipelines: list[str],
        parent: StageOutcome | None,
        started: dt.datetime,
        trace: str | None,
    ) -> dict[str, Any]:
        node, config = outcome.node, outcome.node.config
        moe = config.model.moe or {}
        metrics = result.metrics if result else {}
        return {
            **self._common(),
            "task": config.task,
            "row_type": "stage",
            "pipeline": ",".join(pipelines),
            "stage": node.key,
            "stage_kind": node.kind,
            "run_id": outcome.run_id,
            "parent_run_id": parent.run_id if parent else None,
            "config_hash": node.config_hash,
            "parent_hash": node.parent.config_hash if node.parent else None,
            "shared": len(pipelines) > 1 or (self.trial is not None and node.key in self.trial.shared_stages),
            "cached": False,
            "status": outcome.status,
            "error": None if trace is None else f"{outcome.error}\n{trace}",
            "num_experts": moe.get("num_experts"),
            "top_k": moe.get("top_k"),
            "moe_layers": json.dumps(config.model.moe_layers) if moe else None,
            "residual_rank": moe.get("residual_rank"),
            "budget_steps": result.total_steps if result else config.budget.steps,
            "budget_epochs": config.budget.epochs,
            "metric_name": _metric_name(node),
            "metric": outcome.metric,
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("val_", "loss/", "initial/"))},
            "val_loss": metrics.get("val_loss"),
            "train_loss": metrics.get("task_loss"),
            "flops": outcome.cost.flops,
            "device_kind": config.scaling.device_kind,
            "num_workers": config.scaling.num_workers,
            "wall_seconds": result.cost.wall_seconds if result else None,
            "device_seconds": outcome.cost.device_seconds,
            "gpu_days": outcome.cost.gpu_days,
            "dollars": outcome.cost.dollars,
            "telemetry": {k: v for k, v in metrics.items() if k.startswith("moe/")},
            "history": metrics.get("history"),
            "config": config.to_dict(),
            "checkpoint_uri": outcome.checkpoint_uri,
            "started_at": started,
            "finished_at": _now(),
        }

    def _pipeline_rows(self, summaries: dict[str, PipelineSummary]) -> list[dict[str, Any]]:
        dense = summaries.get("dense")
        rows = []
        for name, summary in summaries.items():
            cost = summary.cost
            marginal = cost - dense.cost if dense is not None and dense.ok else None
            stages = [
                {
                    "stage": s.node.key,
                    "run_id": s.run_id,
                    "status": s.status,
                    "shared": s.node.key in summary.shared,
                    "flops": s.cost.flops,
                    "device_seconds": s.cost.device_seconds,
                    "dollars": s.cost.dollars,
                }
                for s in summary.stages
            ]
            last = summary.stages[-1]
            rows.append(
                {
                    **self._common(),
                    "task": self.exp.downstream.task,
                    "row_type": "pipeline",
                    "pipeline": name,
                    "stage": last.node.key,
                    "run_id": self.trial.run_id if self.trial else f"{self.exp.name}-{name}-{uuid.uuid4().hex[:8]}",
                    "parent_run_id": last.run_id,
                    "status": "succeeded" if summary.ok else "failed",
                    "error": "; ".join(f"{s.node.key}: {s.error}" for s in summary.stages if s.error) or None,
                    "metric_name": self.exp.metric_name,
                    "metric": summary.metric,
                    "flops": cost.flops,
                    "device_seconds": cost.device_seconds,
                    "gpu_days": cost.gpu_days,
                    "dollars": cost.dollars,
                    "marginal_flops": marginal.flops if marginal else None,
                    "marginal_device_seconds": marginal.device_seconds if marginal else None,
                    "marginal_dollars": marginal.dollars if marginal else None,
                    "num_experts": None if name == "dense" else self.exp.moe.num_experts,
                    "top_k": None if name == "dense" else self.exp.moe.top_k,
                    "config": {"stages": stages, "experiment": self.exp.to_dict()},
                    "checkpoint_uri": last.checkpoint_uri,
                    "finished_at": _now(),
                }
            )
        return rows


def _leads_to(node: StageNode, keys: set[str], stages: list[StageNode]) -> bool:
    """Whether `node` is one of `keys` or an ancestor of one of them within its pipeline."""
    return any(s.key in keys and node in s.lineage for s in stages)


def format_report(report: ExperimentReport) -> str:
    """The closing table: metric, total cost, Δ metric vs dense, cost ÷ the MoE pipeline's cost."""
    dense, moe = report.summaries.get("dense"), report.summaries.get("moe")
    metric = next((_metric_name(s.stages[-1].node) for s in report.summaries.values()), "accuracy")
    header = f"{'pipeline':<10}{metric:>10}{'FLOPs':>11}{'device-s':>10}{'dollars':>10}{'Δ vs dense':>12}"
    header += f"{'time ÷ MoE':>12}{'FLOPs ÷ MoE':>13}  status"
    lines = [header, "-" * len(header)]
    for name, summary in report.summaries.items():
        cost = summary.cost
        delta = _delta(summary.metric, dense.metric if dense else None)
        time_ratio = _ratio(cost.device_seconds, moe.cost.device_seconds if moe and moe.ok else None)
        flops_ratio = _ratio(cost.flops, moe.cost.flops if moe and moe.ok else None)
        lines.append(
            f"{name:<10}{_fmt(summary.metric):>10}{cost.flops:>11.3g}{cost.device_seconds:>10.0f}{cost.dollars:>10.4f}"
            f"{delta:>12}{time_ratio:>12}{flops_ratio:>13}  {'ok' if summary.ok else 'FAILED'}"
        )
    return "\n".join(lines)


def _metric_name(node: StageNode) -> str:
    return METRIC_NAMES[node.config.task]


def _split_sizes(card: DatasetCard) -> str:
    return ", ".join(f"{split} {info.num_rows}" for split, info in card.splits.items())


def _delta(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.3f}"


def _ratio(value: float, reference: float | None) -> str:
    return "-" if not reference else f"{value / reference:.2f}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
