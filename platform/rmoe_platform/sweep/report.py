"""The sweep's closing tables, from its pipeline rows: the Pareto-optimal settings (metric versus total
cost) and the best setting per residual budget. A setting run with several seeds is one entry: the means
of its succeeded replicates, with the metric's 95% interval."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from rmoe_platform.results.analysis import pareto_front
from rmoe_platform.results.replicates import interval

COST_LABELS = {"dollars": "dollars", "device_seconds": "device-s", "gpu_days": "GPU-days", "flops": "FLOPs"}


def trial_rows(rows: Sequence[dict[str, Any]], sweep_id: str) -> list[dict[str, Any]]:
    """The sweep's pipeline rows, one per trial: the newest, should a trial have several, except that a
    'failed' row never outranks a 'stopped' or 'succeeded' one. A trial ASHA stops is torn down mid-stage
    and may write a 'failed' row of its own; which of the two lands last is a race."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("row_type") != "pipeline" or row.get("sweep_id") != sweep_id:
            continue
        kept = latest.get(row["run_id"])
        if kept is None or row.get("status") != "failed" or kept.get("status") == "failed":
            latest[row["run_id"]] = row
    return list(latest.values())


def setting_rows(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per swept setting over its succeeded replicates (trials of the same params, other seeds):
    the mean metric and costs, `seeds` (how many) and `metric_half_width` (of the 95% interval; NaN for one).
    Settings with no succeeded trial are left out (a stopped or failed trial has no final result)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in trials:
        if row.get("status") == "succeeded" and row.get("metric") is not None:
            groups.setdefault(_label(params_of(row)), []).append(row)
    out = []
    for rows in groups.values():
        metric = interval(r["metric"] for r in rows)
        assert metric is not None
        merged = {**rows[-1], "metric": metric.mean, "seeds": metric.n, "metric_half_width": metric.half_width}
        for column in COST_LABELS:
            merged[column] = sum(_num(r.get(column)) for r in rows) / len(rows)
        out.append(merged)
    return out


def pareto_rows(trials: Sequence[dict[str, Any]], cost: str) -> list[dict[str, Any]]:
    """Finished settings (means over their seeds) on the metric-versus-cost frontier, cheapest first."""
    finished = setting_rows(trials)
    front = pareto_front([_num(r.get(cost)) for r in finished], [_num(r.get("metric")) for r in finished])
    return [finished[i] for i in front]


def best_per_budget(trials: Sequence[dict[str, Any]], budget_param: str) -> list[tuple[str, dict[str, Any]]]:
    """For each value of the swept residual budget, the finished setting with the best (mean) metric."""
    best: dict[str, dict[str, Any]] = {}
    for row in setting_rows(trials):
        label = _label(params_of(row).get(budget_param))
        if label not in best or row["metric"] > best[label]["metric"]:
            best[label] = row
    return sorted(best.items(), key=lambda item: _num(item[1].get("flops")))


def format_tables(trials: Sequence[dict[str, Any]], cost: str, metric_name: str, budget_param: str | None) -> str:
    if not trials:
        return "no trial rows"
    statuses: dict[str, int] = {}
    for row in trials:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    lines = [f"{len(trials)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))]
    lines += ["", f"Pareto-optimal settings ({metric_name} vs total {COST_LABELS[cost]}):"]
    lines += _table(pareto_rows(trials, cost), cost, metric_name, None)
    if budget_param is not None:
        lines += ["", f"Best setting per {budget_param}:"]
        lines += _table([row for _, row in best_per_budget(trials, budget_param)], cost, metric_name, budget_param)
    return "\n".join(lines)


def _table(rows: Sequence[dict[str, Any]], cost: str, metric_name: str, first: str | None) -> list[str]:
    if not rows:
        return ["  (no finished trial)"]
    header = f"  {metric_name:>10}  {'± 95% CI':>9}  {'seeds':>5}  {COST_LABELS[cost]:>12}  {'device-s':>9}  setting"
    out = [header]
    for row in rows:
        params = params_of(row)
        ordered = ([first] if first in params else []) + [k for k in params if k != first]
        setting = ", ".join(f"{k}={_label(params[k])}" for k in ordered)
        metric, spent, seconds = _num(row.get("metric")), _num(row.get(cost)), _num(row.get("device_seconds"))
        half, seeds = _num(row.get("metric_half_width")), row.get("seeds", 1)
        spread = "-" if math.isnan(half) else f"{half:.3f}"
        out.append(f"  {metric:>10.3f}  {spread:>9}  {seeds:>5}  {spent:>12.4g}  {seconds:>9.0f}  {setting}")
    return out


def params_of(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("params")
    if not raw:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _label(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
