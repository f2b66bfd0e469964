"""Pure functions from results-store rows to what the dashboard shows: parsing with per-row tolerance,
filters, cost units, the overview's points (frontier, dense/MoE references, Δ and ratios) and sweep
pivots; `lineage` (stage breakdowns) and `runs` (histories, run detail) build on them. No Streamlit here:
all of it is unit-tested."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from rmoe_platform.names import METRIC_NAMES, PIPELINES
from rmoe_platform.results.analysis import pareto_front
from rmoe_platform.results.replicates import Interval, interval, paired_difference

JSON_COLUMNS = {"config": dict, "metrics": dict, "telemetry": dict, "history": list, "params": dict}
NO_SWEEP = "(no sweep)"
# Validation keys that are not a quality metric (never offered as the metric axis).
NOT_METRICS = {"val_loss", "val_samples", "val_metric"}
# A point of the comparison is a finished result (frontier, heatmaps) when all, or some, of its seeds succeeded;
# a failed or an ASHA-stopped run is listed, never compared.
FINISHED = ("succeeded", "partial")
NO_SEED = -1  # the seed of rows written before rows recorded one (results schema < 4)


@dataclass(frozen=True)
class CostUnit:
    key: str
    label: str
    column: str  # results-store column holding this cost
    scale: float = 1.0  # column value × scale = cost in this unit


COST_UNITS = {
    "flops": CostUnit("flops", "FLOPs", "flops"),
    "device_hours": CostUnit("device_hours", "device-hours", "device_seconds", 1 / 3600),
    "gpu_days": CostUnit("gpu_days", "GPU-days", "gpu_days"),
    "dollars": CostUnit("dollars", "dollars", "dollars"),
}


@dataclass
class Parsed:
    """The store's rows as a DataFrame (JSON columns parsed to objects, None where absent or unusable)
    and a warning per kind of problem, so a malformed row costs a message, never the page."""

    frame: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


# ---- parsing ----------------------------------------------------------------------------------------
def parse_rows(table: pa.Table) -> Parsed:
    frame = table.to_pandas()
    warnings: list[str] = []
    known = frame["row_type"].isin(["stage", "pipeline"]) & frame["run_id"].notna()
    if not known.all():
        warnings.append(f"{int((~known).sum())} row(s) without a run id or a known row type were ignored.")
        frame = frame[known].reset_index(drop=True)
    for column, kind in JSON_COLUMNS.items():
        values, bad = [], []
        for run_id, text in zip(frame["run_id"], frame[column], strict=True):
            value = _loads(text, kind)
            if value is _BAD:
                bad.append(str(run_id))
                value = None
            values.append(value)
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
        if bad:
            warnings.append(f"{len(bad)} row(s) have unreadable `{column}` JSON, shown without it: {_few(bad)}.")
    frame["params_label"] = pd.Series([params_label(p) for p in frame["params"]], index=frame.index, dtype=str)
    sweep = frame["sweep_id"].fillna("").astype(str)
    frame["group"] = frame["experiment"].fillna("").astype(str) + "|" + sweep + "|" + frame["params_label"]
    return Parsed(frame, warnings)


_BAD = object()


def _loads(text: Any, kind: type) -> Any:
    if text is None or (isinstance(text, float) and math.isnan(text)) or text == "":
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return _BAD
    if value is None:
        return None
    if not isinstance(value, kind):
        return _BAD
    if kind is list and not all(isinstance(item, dict) for item in value):
        return _BAD
    return value


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def value_label(value: Any) -> str:
    """A stable text label for a swept value: numbers as written, other values as compact sorted JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def params_label(params: Mapping[str, Any] | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{name}={value_label(params[name])}" for name in sorted(params))


def label_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels, numerically when each one is a number, else by text (nulls last)."""
    distinct = sorted(set(labels))

    def key(label: str) -> tuple[int, float, str]:
        try:
            return (0, float(label), label)
        except ValueError:
            return (1 if label != "null" else 2, 0.0, label)

    return sorted(distinct, key=key)


# ---- filters --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """Chosen values per filter; an empty tuple keeps every row."""

    experiments: tuple[str, ...] = ()
    sweeps: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    models: tuple[str, ...] = ()


def filter_options(frame: pd.DataFrame) -> dict[str, list[str]]:
    sweeps = sorted(frame["sweep_id"].dropna().astype(str).unique())
    return {
        "experiments": sorted(frame["experiment"].dropna().astype(str).unique()),
        "sweeps": ([NO_SWEEP] if frame["sweep_id"].isna().any() else []) + sweeps,
        "tasks": sorted(frame["task"].dropna().astype(str).unique()),
        "models": sorted(frame["arch"].dropna().astype(str).unique()),
    }


def apply_filters(frame: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    for column, chosen in (("experiment", filters.experiments), ("task", filters.tasks), ("arch", filters.models)):
        if chosen:
            keep &= frame[column].isin(list(chosen))
    if filters.sweeps:
        sweep = frame["sweep_id"].fillna(NO_SWEEP)
        keep &= sweep.isin(list(filters.sweeps))
    return frame[keep]


# ---- costs and metrics ----------------------------------------------------------------------------
def cost_of(row: Mapping[str, Any], unit: CostUnit) -> float:
    """One row's cost in `unit` (NaN when the row lacks it, e.g. GPU-days of rows from before the column)."""
    value = row.get(unit.column)
    if value is None or isnan(value):
        return math.nan
    return float(value) * unit.scale


def costs(frame: pd.DataFrame, unit: CostUnit) -> pd.Series:
    return pd.to_numeric(frame[unit.column], errors="coerce").astype(float) * unit.scale


def overhead_hours(frame: pd.DataFrame) -> pd.Series:
    """Device-hours of overhead (start-up, checkpoints, teardown), reported beside the compared cost and never
    in it; NaN for rows written before the cost ledger (schema < 3), whose cost still includes it."""
    if "overhead_device_seconds" not in frame:
        return pd.Series(math.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame["overhead_device_seconds"], errors="coerce").astype(float) / 3600.0


def metric_options(frame: pd.DataFrame) -> list[str]:
    """The pipelines' headline metrics first, then every other validation metric their final stages report."""
    pipelines = frame[frame["row_type"] == "pipeline"]
    names = [str(n) for n in pipelines["metric_name"].dropna().unique()]
    finals = _stage_metrics(frame)
    extra: set[str] = set()
    for run_id in pipelines["parent_run_id"].dropna():
        extra.update(k[4:] for k in finals.get(run_id, {}) if k.startswith("val_") and k not in NOT_METRICS)
    ordered = [m for m in METRIC_NAMES.values() if m in names] + sorted(set(names) - set(METRIC_NAMES.values()))
    return ordered + sorted(extra - set(ordered))


def _stage_metrics(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    stages = frame[frame["row_type"] == "stage"]
    return {rid: m for rid, m in zip(stages["run_id"], stages["metrics"], strict=True) if isinstance(m, dict)}


def isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# ---- overview -------------------------------------------------------------------------------------
def latest_pipeline_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest pipeline row per experiment (or sweep trial), pipeline and seed: re-running an experiment
    appends fresh summary rows, which supersede the older ones of the same seed."""
    rows = frame[frame["row_type"] == "pipeline"].copy()
    rows["_order"] = range(len(rows))
    rows["_seed"] = seeds_of(rows)
    rows = rows.sort_values(["finished_at", "_order"], na_position="first", kind="stable")
    rows = rows.drop_duplicates(["group", "pipeline", "_seed"], keep="last")
    return rows.sort_values("_order").drop(columns=["_order", "_seed"])


def seeds_of(rows: pd.DataFrame) -> pd.Series:
    """Each row's seed (NO_SEED where the row predates the column)."""
    if "seed" not in rows:
        return pd.Series(NO_SEED, index=rows.index, dtype=int)
    return pd.to_numeric(rows["seed"], errors="coerce").fillna(NO_SEED).astype(int)


@dataclass
class Overview:
    points: pd.DataFrame  # one row per pipeline run: metric, cost, x (cost or marginal), references, frontier flag
    references: pd.DataFrame  # the dense / MoE baselines drawn as reference lines
    notes: list[str] = field(default_factory=list)


def overview(frame: pd.DataFrame, metric: str, unit: CostUnit, *, marginal: bool = False) -> Overview:
    """One point per pipeline of each experiment (or sweep trial), over its seeds: the mean of `metric` and
    of the cost in `unit` (or the cost beyond the dense pipeline's) with their 95% intervals, the Pareto
    frontier over the means of finished points, and the paper's comparisons: Δ metric vs dense (paired by
    seed, with its interval), cost ÷ MoE cost."""
    rows = latest_pipeline_rows(frame)
    finals = _stage_metrics(frame)
    values = [_metric_value(row, metric, finals) for row in rows.to_dict("records")]
    rows["value"] = pd.Series(values, index=rows.index, dtype=float)
    rows = rows[(rows["metric_name"] == metric) | rows["value"].notna()]
    runs = pd.DataFrame(
        {
            "group": rows["group"],
            "experiment": rows["experiment"],
            "sweep_id": rows["sweep_id"],
            "params": rows["params_label"],
            "pipeline": rows["pipeline"],
            "core": [core_label(row) for row in rows.to_dict("records")],
            "run_id": rows["run_id"],
            "status": rows["status"],
            "seed": seeds_of(rows),
            "metric": rows["value"],
            "cost": costs(rows, unit),
            "overhead_hours": overhead_hours(rows),
        }
    )
    points = replicate_points(runs)
    for baseline in ("dense", "moe"):
        ref = reference_index(points, baseline)
        for column in ("metric", "cost", "seed_metrics"):
            points[f"{baseline}_{column}"] = [points.at[i, column] if i >= 0 else _missing(column) for i in ref]
    points["delta_vs_dense"] = points["metric"] - points["dense_metric"]
    paired = [
        paired_difference(mine, dense) if isinstance(dense, dict) else None
        for mine, dense in zip(points["seed_metrics"], points["dense_seed_metrics"], strict=True)
    ]
    points["delta_low"] = [d.low if d else math.nan for d in paired]
    points["delta_high"] = [d.high if d else math.nan for d in paired]
    points["delta_distinguishable"] = [bool(d and d.excludes_zero) for d in paired]
    points["cost_over_moe"] = points["cost"] / points["moe_cost"].where(points["moe_cost"] > 0)
    points["marginal_cost"] = points["cost"] - points["dense_cost"]
    points["x"] = points["marginal_cost"] if marginal else points["cost"]
    points["x_low"] = math.nan if marginal else points["cost_low"]
    points["x_high"] = math.nan if marginal else points["cost_high"]
    finished = points["status"].isin(FINISHED)
    points["pareto"] = pareto_mask(points["x"].where(finished).tolist(), points["metric"].tolist())
    notes = []
    unplotted = points[["x", "metric"]].isna().any(axis=1)
    if unplotted.any():
        why = "no dense reference for the marginal cost, " if marginal else ""
        notes.append(
            f"{int(unplotted.sum())} pipeline run(s) are listed but not plotted ({why}a failed run, "
            f"or no {metric} / {unit.label} recorded)."
        )
    if (~finished).any():
        notes.append(f"{int((~finished).sum())} failed or early-stopped run(s) are never on the frontier.")
    references = points[points["pipeline"].isin(["dense", "moe"]) & points["metric"].notna() & finished]
    references = references[["pipeline", "experiment", "params", "metric", "x"]].reset_index(drop=True)
    return Overview(points, references, notes)


def replicate_points(runs: pd.DataFrame) -> pd.DataFrame:
    """One point per (group, pipeline) from its runs (one per seed): over the succeeded runs, the mean and
    95% interval of metric and cost and the metric per seed; status `succeeded` (every seed), `partial`
    (some) or, when none succeeded, the latest run's own status, metric and cost (a failed or stopped run)."""
    points = []
    for (_, _), group in runs.groupby(["group", "pipeline"], sort=False):
        ok = group[(group["status"] == "succeeded") & group["metric"].notna()]
        used = ok if len(ok) else group.tail(1)
        latest = group.iloc[-1]
        metric, cost = interval(used["metric"]), interval(used["cost"])
        status = ("succeeded" if len(ok) == len(group) else "partial") if len(ok) else latest["status"]
        points.append(
            {
                **{k: latest[k] for k in ("group", "experiment", "sweep_id", "params", "pipeline", "core", "run_id")},
                "status": status,
                "seeds": len(ok),
                "seed_list": ", ".join(str(s) for s in sorted(ok["seed"]) if s != NO_SEED),
                "seed_metrics": dict(zip(ok["seed"], ok["metric"], strict=True)),
                **_interval_columns("metric", metric),
                **_interval_columns("cost", cost),
                "overhead_hours": float(used["overhead_hours"].mean()),
            }
        )
    columns = ["group", "experiment", "sweep_id", "params", "pipeline", "core", "run_id", "status", "seeds"]
    columns += ["seed_list", "seed_metrics", "metric", "metric_low", "metric_high", "metric_std"]
    columns += ["cost", "cost_low", "cost_high", "cost_std", "overhead_hours"]
    return pd.DataFrame(points, columns=columns)


def _interval_columns(name: str, value: Interval | None) -> dict[str, float]:
    if value is None:
        return {name: math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan, f"{name}_std": math.nan}
    return {name: value.mean, f"{name}_low": value.low, f"{name}_high": value.high, f"{name}_std": value.std}


def _missing(column: str) -> Any:
    return None if column == "seed_metrics" else math.nan


def core_label(row: Mapping[str, Any]) -> str:
    """Where a pipeline run's dense core came from: "imported" (a pretrained model read from
    `upstream.checkpoint`, charged its declared cost) or "trained" (its own upstream stage; the MoE
    pipeline trains no dense core, "-")."""
    if row.get("imported") is True:
        return "imported"
    return "-" if row.get("pipeline") == "moe" else "trained"


def _metric_value(row: Mapping[str, Any], metric: str, finals: Mapping[str, Mapping[str, Any]]) -> float:
    if row.get("metric_name") == metric:
        value = row.get("metric")
    else:
        value = finals.get(str(row.get("parent_run_id")), {}).get(f"val_{metric}")
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def reference_index(points: pd.DataFrame, pipeline: str) -> list[int]:
    """Per point, the position of its `pipeline` baseline (-1 if none): the one of the same experiment run
    (or sweep trial), else that experiment's plain (non-sweep) run, else its latest run of that pipeline."""
    candidates = points.index[(points["pipeline"] == pipeline) & points["metric"].notna()].tolist()
    out = []
    for i in points.index:
        same_exp = [j for j in candidates if points.at[j, "experiment"] == points.at[i, "experiment"]]
        same_group = [j for j in same_exp if points.at[j, "group"] == points.at[i, "group"]]
        plain = [j for j in same_exp if pd.isna(points.at[j, "sweep_id"])]
        choice = same_group or plain or same_exp
        out.append(choice[-1] if choice else -1)
    return out


def pareto_mask(costs: Sequence[float], metrics: Sequence[float]) -> list[bool]:
    """Which points lie on the Pareto frontier (higher metric, lower cost is better)."""
    clean = [None if isnan(c) else c for c in costs], [None if isnan(m) else m for m in metrics]
    front = set(pareto_front(*clean, maximize=True))
    return [i in front for i in range(len(costs))]


def paper_table(points: pd.DataFrame, metric: str, unit: CostUnit) -> pd.DataFrame:
    """The paper-style comparison over seeds: metric and cost as means with their 95% intervals, Δ metric vs
    dense paired by seed with its interval (and whether it excludes 0), cost ÷ MoE, frontier membership."""
    table = pd.DataFrame(
        {
            "pipeline": points["pipeline"],
            "core": points["core"],
            "experiment": points["experiment"],
            "params": points["params"],
            "seeds": points["seeds"],
            metric: points["metric"],
            f"{metric} ± (95% CI)": (points["metric_high"] - points["metric_low"]) / 2,
            f"cost ({unit.label})": points["cost"],
            "cost ± (95% CI)": (points["cost_high"] - points["cost_low"]) / 2,
            f"marginal cost ({unit.label})": points["marginal_cost"],
            "overhead (device-hours)": points["overhead_hours"],
            "Δ vs dense": points["delta_vs_dense"],
            "Δ 95% CI": [_bounds(lo, hi) for lo, hi in zip(points["delta_low"], points["delta_high"], strict=True)],
            "Δ beyond noise": points["delta_distinguishable"],
            "cost ÷ MoE": points["cost_over_moe"],
            "Pareto": points["pareto"],
            "status": points["status"],
            "run_id": points["run_id"],
        }
    )
    if not table["params"].astype(bool).any():
        table = table.drop(columns="params")
    order = {name: i for i, name in enumerate(PIPELINES)}
    table["_order"] = table["pipeline"].map(order).fillna(len(order))
    return table.sort_values(["experiment", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _bounds(low: float, high: float) -> str:
    return "" if isnan(low) or isnan(high) else f"[{low:+.4f}, {high:+.4f}]"


# ---- sweeps ---------------------------------------------------------------------------------------
def sweep_trials(points: pd.DataFrame, frame: pd.DataFrame, sweep_id: str) -> pd.DataFrame:
    """One row per trial of `sweep_id`: its swept parameters (as labels), metric, cost and status."""
    trials = points[points["sweep_id"] == sweep_id]
    params = frame.drop_duplicates("group", keep="last").set_index("group")["params"]
    names = sorted({k for g in trials["group"] for k in (params.get(g) or {})})
    table = pd.DataFrame({"run_id": trials["run_id"], "pipeline": trials["pipeline"]})
    for name in names:
        table[name] = [value_label((params.get(g) or {}).get(name)) for g in trials["group"]]
    table["metric"] = trials["metric"]
    table["cost"] = trials["cost"]
    table["status"] = trials["status"]
    return table.reset_index(drop=True)


def swept_axes(trials: pd.DataFrame) -> list[str]:
    """Parameter columns of `sweep_trials`, those that vary first (num_experts, residual_budget lead)."""
    fixed = {"run_id", "pipeline", "metric", "cost", "status"}
    names = [c for c in trials.columns if c not in fixed]
    preferred = {"num_experts": 0, "residual_budget": 1}
    return sorted(names, key=lambda n: (trials[n].nunique() <= 1, preferred.get(n, 2), n))


def sweep_pivot(trials: pd.DataFrame, x: str, y: str | None, value: str) -> pd.DataFrame:
    """Mean of `value` per (x, y) cell over the other swept axes, with the trial count per cell; only finished
    trials count (one ASHA stopped early, or one that failed, says nothing of its cell's final value)."""
    keys = [x] if y is None or y == x else [x, y]
    present = trials[trials["status"].isin(FINISHED)].dropna(subset=[value])
    return present.groupby(keys, as_index=False).agg(value=(value, "mean"), trials=(value, "size"))
