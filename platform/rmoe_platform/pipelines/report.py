"""The closing comparison table of an experiment: each pipeline's metric and total cost, its metric's change
over the dense pipeline, and its cost as a fraction of the MoE pipeline's (the paper's comparison)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rmoe_platform.pipelines.outcomes import ExperimentReport, PipelineSummary
from rmoe_platform.results.replicates import Interval

if TYPE_CHECKING:
    from rmoe_platform.pipelines.replicates import ReplicatedReport


def format_report(report: ExperimentReport) -> str:
    """The closing table: metric, total cost (FLOPs; compute device-seconds and dollars, with the overhead's
    device-seconds beside them, never in them), Δ metric vs dense, compute time ÷ the MoE pipeline's and ÷
    the dense pipeline's, FLOPs ÷ MoE, and where each pipeline's core came from (trained upstream, imported,
    or none: the MoE trained from scratch); an imported core's source and declared cost follow the table."""
    dense, moe = report.summaries.get("dense"), report.summaries.get("moe")
    metric = next((s.stages[-1].node.metric_name for s in report.summaries.values()), "accuracy")
    header = f"{'pipeline':<10}{metric:>10}{'FLOPs':>11}{'compute-s':>11}{'overhead-s':>12}{'dollars':>10}"
    header += f"{'Δ vs dense':>12}{'time ÷ MoE':>12}{'÷ dense':>9}{'FLOPs ÷ MoE':>13}  {'core':<9}status"
    lines = [header, "-" * len(header)]
    for name, summary in report.summaries.items():
        cost = summary.cost
        delta = _delta(summary.metric, dense.metric if dense else None)
        time_ratio = _ratio(cost.device_seconds, moe.cost.device_seconds if moe and moe.ok else None)
        dense_ratio = _ratio(cost.device_seconds, dense.cost.device_seconds if dense and dense.ok else None)
        flops_ratio = _ratio(cost.flops, moe.cost.flops if moe and moe.ok else None)
        lines.append(
            f"{name:<10}{fmt(summary.metric):>10}{cost.flops:>11.3g}{cost.device_seconds:>11.0f}"
            f"{cost.overhead_device_seconds:>12.0f}{cost.dollars:>10.4f}{delta:>12}{time_ratio:>12}{dense_ratio:>9}"
            f"{flops_ratio:>13}  {_core(summary):<9}{'ok' if summary.ok else 'FAILED'}"
        )
    lines.append(
        "compute-s: training + evaluation time x devices (the compared cost; dollars price it); overhead-s: "
        "worker start, setup, ingest start, checkpoints, teardown x devices"
    )
    cores = {id(s.imported): s.imported for s in report.summaries.values() if s.imported is not None}
    lines.extend(f"upstream_dense: {core.summary()}" for core in cores.values())
    return "\n".join(lines)


def format_replicates(report: ReplicatedReport) -> str:
    """The comparison over seeds: per pipeline its metric and compute cost as mean ± the 95% interval's
    half-width (Student t over the seeds) with the standard deviation, and its metric's paired difference to
    the dense and MoE pipelines of the same seeds as [low, high]; `*` marks a difference whose interval
    excludes 0 (distinguishable from seed-to-seed noise), `~` one that does not."""
    first = next(iter(report.reports.values()))
    metric = next((s.stages[-1].node.metric_name for s in first.summaries.values()), "accuracy")
    summaries = report.summaries()
    compute = {s.pipeline: s.compute_seconds for s in summaries}
    header = f"{'pipeline':<10}{'n':>3}{metric + ' (mean ± CI)':>24}{'std':>8}{'compute-s (mean ± CI)':>24}"
    header += f"{'Δ vs dense [95% CI]':>26}{'Δ vs MoE [95% CI]':>26}{'time ÷ MoE':>12}{'÷ dense':>9}"
    lines = [f"{report.experiment}: {len(report.reports)} seeds ({', '.join(map(str, report.reports))})", header]
    lines.append("-" * len(header))
    for summary in summaries:
        moe, dense = compute.get("moe"), compute.get("dense")
        lines.append(
            f"{summary.pipeline:<10}{len(summary.seeds):>3}{_mean_ci(summary.metric, '.3f'):>24}"
            f"{_std(summary.metric):>8}{_mean_ci(summary.compute_seconds, '.0f'):>24}"
            f"{_difference(summary.vs_dense):>26}{_difference(summary.vs_moe):>26}"
            f"{_ratio_of_means(summary.compute_seconds, moe):>12}{_ratio_of_means(summary.compute_seconds, dense):>9}"
        )
    lines.append(
        "CI: 95% Student-t interval over the seeds; Δ: paired by seed; * distinguishable from noise (the interval "
        "excludes 0), ~ not; compute-s: training + evaluation time x devices"
    )
    return "\n".join(lines)


def _mean_ci(value: Interval | None, spec: str) -> str:
    if value is None:
        return "-"
    if value.n < 2:
        return f"{value.mean:{spec}}"
    return f"{value.mean:{spec}} ± {value.half_width:{spec}}"


def _std(value: Interval | None) -> str:
    return "-" if value is None or value.n < 2 else f"{value.std:.3f}"


def _difference(value: Interval | None) -> str:
    if value is None:
        return "-"
    if value.n < 2:
        return f"{value.mean:+.3f}"
    mark = "*" if value.excludes_zero else "~"
    return f"{value.mean:+.3f} [{value.low:+.3f}, {value.high:+.3f}]{mark}"


def _ratio_of_means(value: Interval | None, reference: Interval | None) -> str:
    return "-" if value is None or reference is None or not reference.mean else f"{value.mean / reference.mean:.2f}"


def _core(summary: PipelineSummary) -> str:
    if summary.imported is not None:
        return "imported"
    return "trained" if any(s.node.kind == "upstream_dense" for s in summary.stages) else "-"


def _delta(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.3f}"


def _ratio(value: float, reference: float | None) -> str:
    return "-" if not reference else f"{value / reference:.2f}"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
