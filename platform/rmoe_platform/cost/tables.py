"""The printed cost projection: each stage, then each pipeline's totals with the paper's ratios."""

from __future__ import annotations

from rmoe_platform.cost.estimate import ExperimentEstimate


def format_estimate(est: ExperimentEstimate) -> str:
    spec = est.spec
    lines = [
        f"estimate for {est.experiment} on {est.device}: peak {spec.peak_bf16:.3g} FLOP/s bf16, "
        f"{spec.peak_fp32:.3g} fp32; assumed MFU {spec.mfu:.2f}",
        "",
        f"{'stage':<22}{'samples':>13}{'FLOPs/sample':>14}{'FLOPs':>11}{'prec':>6}{'MFU':>6}"
        f"{'device-h':>11}{'GPU-days':>10}{'dollars':>12}",
    ]
    lines.append("-" * len(lines[-1]))
    for stage in est.stages.values():
        cost = stage.cost
        mfu = (
            "-"
            if stage.mfu_source == "declared"
            else f"{stage.mfu:.2f}" + ("*" if stage.mfu_source == "measured" else "")
        )
        lines.append(
            f"{stage.key:<22}{stage.samples:>13,}{stage.flops_per_sample:>14.3g}{cost.flops:>11.3g}{stage.precision:>6}"
            f"{mfu:>6}{cost.device_hours:>11.4g}{cost.gpu_days:>10.4g}{cost.dollars:>12,.2f}"
        )
    header = f"{'pipeline':<10}{'FLOPs':>11}{'device-h':>11}{'GPU-days':>10}{'dollars':>12}{'÷ MoE':>8}{'÷ dense':>9}"
    lines += ["", header, "-" * len(header)]
    moe = est.pipeline_cost("moe") if "moe" in est.pipelines else None
    dense = est.pipeline_cost("dense") if "dense" in est.pipelines else None
    for pipeline in est.pipelines:
        cost = est.pipeline_cost(pipeline)
        lines.append(
            f"{pipeline:<10}{cost.flops:>11.3g}{cost.device_hours:>11.4g}{cost.gpu_days:>10.4g}{cost.dollars:>12,.2f}"
            f"{_ratio(cost.device_seconds, moe.device_seconds if moe else None):>8}"
            f"{_ratio(cost.device_seconds, dense.device_seconds if dense else None):>9}"
        )
    notes = ["ratios: device time ÷ the MoE / dense pipeline's (shared stages charged in full to each pipeline)"]
    if any(s.mfu_source == "measured" for s in est.stages.values()):
        notes.append("MFU*: measured on an earlier run (--calibrate-from)")
    if any(s.mfu_source == "declared" for s in est.stages.values()):
        notes.append("upstream_dense: imported, charged its declared cost (upstream.cost)")
    return "\n".join([*lines, "", *notes])


def _ratio(value: float, reference: float | None) -> str:
    return "-" if not reference else f"{value / reference:.3f}"
