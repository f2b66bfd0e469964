"""Pure functions from results-store rows to what the dashboard shows: parsing with per-row tolerance,
filters, cost units, the overview's points (frontier, dense/MoE references, Δ and ratios), stage
breakdowns, lineage, sweep pivots and training histories. No Streamlit here: all of it is unit-tested."""

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

JSON_COLUMNS = {"config": dict, "metrics": dict, "telemetry": dict, "history": list, "params": dict}
NO_SWEEP = "(no sweep)"
# Validation keys that are not a quality metric (never offered as the metric axis).
NOT_METRICS = {"val_loss", "val_samples", "val_metric"}


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
    if value is None or _isnan(value):
        return math.nan
    return float(value) * unit.scale


def costs(frame: pd.DataFrame, unit: CostUnit) -> pd.Series:
    return pd.to_numeric(frame[unit.column], errors="coerce").astype(float) * unit.scale


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


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# ---- overview -------------------------------------------------------------------------------------
def latest_pipeline_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest pipeline row per experiment (or sweep trial) and pipeline: re-running an experiment
    appends fresh summary rows, which supersede the older ones."""
    rows = frame[frame["row_type"] == "pipeline"].copy()
    rows["_order"] = range(len(rows))
    rows = rows.sort_values(["finished_at", "_order"], na_position="first", kind="stable")
    rows = rows.drop_duplicates(["group", "pipeline"], keep="last")
    return rows.sort_values("_order").drop(columns="_order")


@dataclass
class Overview:
    points: pd.DataFrame  # one row per pipeline run: metric, cost, x (cost or marginal), references, frontier flag
    references: pd.DataFrame  # the dense / MoE baselines drawn as reference lines
    notes: list[str] = field(default_factory=list)


def overview(frame: pd.DataFrame, metric: str, unit: CostUnit, *, marginal: bool = False) -> Overview:
    """Pipeline runs with `metric` against their cost in `unit` (or cost beyond the dense pipeline's), the
    Pareto frontier over them, and the paper's comparisons: Δ metric vs dense, cost ÷ MoE cost."""
    rows = latest_pipeline_rows(frame)
    finals = _stage_metrics(frame)
    values = [_metric_value(row, metric, finals) for row in rows.to_dict("records")]
    rows["value"] = pd.Series(values, index=rows.index, dtype=float)
    rows = rows[(rows["metric_name"] == metric) | rows["value"].notna()]
    points = pd.DataFrame(
        {
            "group": rows["group"],
            "experiment": rows["experiment"],
            "sweep_id": rows["sweep_id"],
            "params": rows["params_label"],
            "pipeline": rows["pipeline"],
            "run_id": rows["run_id"],
            "status": rows["status"],
            "metric": rows["value"],
            "cost": costs(rows, unit),
        }
    ).reset_index(drop=True)
    for baseline in ("dense", "moe"):
        ref = reference_index(points, baseline)
        points[f"{baseline}_metric"] = [points.at[i, "metric"] if i >= 0 else math.nan for i in ref]
        points[f"{baseline}_cost"] = [points.at[i, "cost"] if i >= 0 else math.nan for i in ref]
    points["delta_vs_dense"] = points["metric"] - points["dense_metric"]
    points["cost_over_moe"] = points["cost"] / points["moe_cost"].where(points["moe_cost"] > 0)
    points["marginal_cost"] = points["cost"] - points["dense_cost"]
    points["x"] = points["marginal_cost"] if marginal else points["cost"]
    points["pareto"] = pareto_mask(points["x"].tolist(), points["metric"].tolist())
    notes = []
    unplotted = points[["x", "metric"]].isna().any(axis=1)
    if unplotted.any():
        why = "no dense reference for the marginal cost, " if marginal else ""
        notes.append(
            f"{int(unplotted.sum())} pipeline run(s) are listed but not plotted ({why}a failed run, "
            f"or no {metric} / {unit.label} recorded)."
        )
    references = points[points["pipeline"].isin(["dense", "moe"]) & points["metric"].notna()]
    references = references[["pipeline", "experiment", "params", "metric", "x"]].reset_index(drop=True)
    return Overview(points, references, notes)


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
    clean = [None if _isnan(c) else c for c in costs], [None if _isnan(m) else m for m in metrics]
    front = set(pareto_front(*clean, maximize=True))
    return [i in front for i in range(len(costs))]


def paper_table(points: pd.DataFrame, metric: str, unit: CostUnit) -> pd.DataFrame:
    """The paper-style comparison: metric, cost, Δ metric vs dense, cost ÷ MoE, frontier membership."""
    table = pd.DataFrame(
        {
            "pipeline": points["pipeline"],
            "experiment": points["experiment"],
            "params": points["params"],
            metric: points["metric"],
            f"cost ({unit.label})": points["cost"],
            f"marginal cost ({unit.label})": points["marginal_cost"],
            "Δ vs dense": points["delta_vs_dense"],
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


# ---- pipelines: stage breakdown and lineage ---------------------------------------------------------
def stage_breakdown(frame: pd.DataFrame, unit: CostUnit) -> pd.DataFrame:
    """Each pipeline run's stages in order with their cost in `unit` (from the stage's own row when the
    store has it, else from the pipeline row's summary) and whether pipelines share the stage."""
    stage_rows = {r["run_id"]: r for r in frame[frame["row_type"] == "stage"].to_dict("records")}
    out = []
    for row in latest_pipeline_rows(frame).to_dict("records"):
        stages = (row["config"] or {}).get("stages") or []
        for position, entry in enumerate(stages):
            if not isinstance(entry, dict):
                continue
            source = stage_rows.get(entry.get("run_id"), entry)
            out.append(
                {
                    "experiment": row["experiment"],
                    "group": row["group"],
                    "params": row["params_label"],
                    "pipeline": row["pipeline"],
                    "position": position,
                    "stage": entry.get("stage"),
                    "run_id": entry.get("run_id"),
                    "status": entry.get("status"),
                    "shared": bool(entry.get("shared")),
                    "cost": cost_of(source, unit),
                }
            )
    columns = ["experiment", "group", "params", "pipeline", "position", "stage", "run_id", "status", "shared", "cost"]
    return pd.DataFrame(out, columns=columns)


def lineage(frame: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """The stage runs from the first ancestor down to `run_id`, following `parent_run_id`."""
    stages = frame[frame["row_type"] == "stage"].drop_duplicates("run_id", keep="last").set_index("run_id")
    chain: list[str] = []
    current: Any = run_id
    while isinstance(current, str) and current and current not in chain:
        chain.append(current)
        current = stages.at[current, "parent_run_id"] if current in stages.index else None
    rows = []
    for rid in reversed(chain):
        found = rid in stages.index
        rows.append(
            {
                "stage": stages.at[rid, "stage"] if found else "(not in the store)",
                "run_id": rid,
                "status": stages.at[rid, "status"] if found else None,
                "checkpoint_uri": stages.at[rid, "checkpoint_uri"] if found else None,
            }
        )
    return pd.DataFrame(rows, columns=["stage", "run_id", "status", "checkpoint_uri"])


def lineage_dot(breakdown: pd.DataFrame) -> str:
    """A Graphviz graph of the stage runs (shared ones once, filled) and the pipelines they feed."""
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, style="rounded", fontsize=10];']
    seen: set[str] = set()
    for (_, pipeline), stages in breakdown.groupby(["group", "pipeline"], sort=False):
        previous = None
        for entry in stages.sort_values("position").to_dict("records"):
            node = _dot_id(entry["run_id"] or f"{pipeline}-{entry['position']}")
            if node not in seen:
                seen.add(node)
                style = ', style="rounded,filled", fillcolor="#dde8f5"' if entry["shared"] else ""
                label = f"{entry['stage']}\\n{entry['run_id'] or ''}\\n{entry['status']}"
                lines.append(f'  {node} [label="{_dot_escape(label)}"{style}];')
            if previous is not None:
                lines.append(f"  {previous} -> {node};")
            previous = node
        leaf = _dot_id(f"pipeline-{stages['group'].iloc[0]}-{pipeline}")
        lines.append(f'  {leaf} [label="{_dot_escape(str(pipeline))}", shape=ellipse];')
        if previous is not None:
            lines.append(f"  {previous} -> {leaf} [style=dashed];")
    lines.append("}")
    return "\n".join(lines)


def _dot_id(text: str) -> str:
    return '"' + _dot_escape(text) + '"'


def _dot_escape(text: str) -> str:
    return text.replace('"', "'")


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
    """Mean of `value` per (x, y) cell over the other swept axes, with the trial count per cell."""
    keys = [x] if y is None or y == x else [x, y]
    present = trials.dropna(subset=[value])
    return present.groupby(keys, as_index=False).agg(value=(value, "mean"), trials=(value, "size"))


# ---- histories ------------------------------------------------------------------------------------
def history_frame(history: list[dict[str, Any]] | None) -> pd.DataFrame:
    """A stage's reports as a wide numeric table, one row per report, in step order."""
    if not history:
        return pd.DataFrame(columns=["step"])
    frame = pd.DataFrame.from_records(history)
    frame = frame.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all")
    if "step" not in frame.columns:
        frame["step"] = range(1, len(frame) + 1)
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def curve_groups(columns: Iterable[str]) -> dict[str, list[str]]:
    """The history's series grouped into the charts of the run-detail page."""
    columns = list(columns)
    validation = [c for c in columns if c.startswith("val_") and c not in NOT_METRICS]
    groups = {
        "loss": [c for c in ("loss", "task_loss", "aux_loss", "val_loss") if c in columns]
        + sorted(c for c in columns if c.startswith("loss/")),
        "validation": sorted(validation),
        "learning rate": [c for c in columns if c == "lr"],
        "gradient norm": [c for c in columns if c == "grad_norm"],
    }
    return {name: keys for name, keys in groups.items() if keys}


def curves(history: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Long format (step, series, value) of `keys`, for one multi-line chart."""
    present = [k for k in keys if k in history.columns]
    if not present:
        return pd.DataFrame(columns=["step", "series", "value"])
    long = history.melt(id_vars="step", value_vars=present, var_name="series", value_name="value")
    return long.dropna(subset=["value"]).reset_index(drop=True)


def moe_layers(keys: Iterable[str]) -> list[str]:
    """MoE layer names in `moe/<layer>/<stat>` keys, in model order."""
    layers = {key[4:].rsplit("/", 1)[0] for key in keys if key.startswith("moe/") and key.count("/") >= 2}
    return sorted(layers, key=_natural)


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in name.replace("/", ".").split(".")]


def expert_loads(history: pd.DataFrame, layer: str) -> pd.DataFrame:
    """(step, expert, fraction): each expert's share of the layer's routed tokens over training."""
    prefix = f"moe/{layer}/load_"
    keys = sorted((c for c in history.columns if c.startswith(prefix)), key=lambda c: int(c[len(prefix) :]))
    long = curves(history, keys)
    long["expert"] = long.pop("series").str[len(prefix) :].astype(int)
    return long.rename(columns={"value": "fraction"})[["step", "expert", "fraction"]]


def layer_stats(history: pd.DataFrame, layer: str, stats: Sequence[str]) -> pd.DataFrame:
    """(step, series, value) of a layer's router statistics over training."""
    long = curves(history, [f"moe/{layer}/{stat}" for stat in stats])
    long["series"] = long["series"].str.rsplit("/", n=1).str[-1]
    return long


def telemetry_table(telemetry: Mapping[str, Any] | None) -> pd.DataFrame:
    """A stage's final MoE telemetry, one row per layer and one column per statistic (loads excluded)."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in (telemetry or {}).items():
        if not key.startswith("moe/") or key.count("/") < 2:
            continue
        layer, stat = key[4:].rsplit("/", 1)
        if not stat.startswith("load_"):
            rows.setdefault(layer, {"layer": layer})[stat] = value
    return pd.DataFrame([rows[k] for k in sorted(rows, key=_natural)])


# ---- run detail -----------------------------------------------------------------------------------
def run_label(row: Mapping[str, Any]) -> str:
    extra = f" [{row['params_label']}]" if row.get("params_label") else ""
    return f"{row.get('experiment')} · {row.get('stage')} · {row.get('status')}{extra} · {row.get('run_id')}"


def stage_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Stage rows, newest first (the run pickers' order)."""
    stages = frame[frame["row_type"] == "stage"].copy()
    stages["_order"] = range(len(stages))
    stages = stages.sort_values(["finished_at", "_order"], ascending=False, na_position="last", kind="stable")
    return stages.drop(columns="_order").reset_index(drop=True)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with missing values as None (pandas gives NaN for a missing string)."""
    return [{k: None if _isnan(v) else v for k, v in row.items()} for row in frame.to_dict("records")]


def has_moe(row: Mapping[str, Any]) -> bool:
    """Evidence that a stage trained MoE layers (downstream rows of MoE pipelines have no `num_experts`)."""
    if row.get("num_experts") is not None and not _isnan(row.get("num_experts")):
        return True
    keys = set(row.get("telemetry") or {}) | {k for r in (row.get("history") or [])[-1:] for k in r}
    if any(k.startswith("moe/") for k in keys):
        return True
    return row.get("stage_kind") == "downstream" and row.get("pipeline") not in (None, "dense")


def expert_runs(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Succeeded stage runs for the Experts page: MoE ones first, those with a checkpoint and a MoE
    history before the others, newest first within each."""

    def rank(row: Mapping[str, Any]) -> tuple[bool, bool, bool]:
        last = (row.get("history") or [{}])[-1]
        return (not has_moe(row), not row.get("checkpoint_uri"), not any(k.startswith("moe/") for k in last))

    return sorted((r for r in records(stage_runs(frame)) if r.get("status") == "succeeded"), key=rank)


def run_summary(row: Mapping[str, Any]) -> pd.DataFrame:
    """The scalar fields of one row as a two-column table."""
    skip = set(JSON_COLUMNS) | {"error", "group", "params_label", "schema_version"}
    items = [(k, v) for k, v in row.items() if k not in skip and v is not None and not _isnan(v)]
    return pd.DataFrame({"field": [k for k, _ in items], "value": [str(v) for _, v in items]})
