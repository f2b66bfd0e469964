"""The closing comparison table of an experiment: each pipeline's metric and total cost, its metric's change
over the dense pipeline, and its cost as a fraction of the MoE pipeline's (the paper's comparison)."""

from __future__ import annotations

from rmoe_platform.pipelines.outcomes import ExperimentReport, PipelineSummary


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
