"""Pure functions for the pipelines page: each pipeline run's stages with their cost, a stage run's
lineage (its ancestors through `parent_run_id`), and the Graphviz graph of both."""

from __future__ import annotations

from typing import Any

import pandas as pd

from dashboard.processing import NO_SEED, CostUnit, cost_of, isnan, latest_pipeline_rows, seeds_of


def stage_breakdown(frame: pd.DataFrame, unit: CostUnit) -> pd.DataFrame:
    """Each pipeline run's stages in order with their cost in `unit` (from the stage's own row when the
    store has it, else from the pipeline row's summary) and whether pipelines share the stage. `run` is the
    experiment run (or sweep trial) and, for replicates, its seed: each seed's pipelines are one run."""
    stage_rows = {r["run_id"]: r for r in frame[frame["row_type"] == "stage"].to_dict("records")}
    out = []
    latest = latest_pipeline_rows(frame)
    latest = latest.assign(_seed=seeds_of(latest))
    for row in latest.to_dict("records"):
        seed = int(row["_seed"])
        run = row["group"] + (f"|seed {seed}" if seed != NO_SEED else "")
        stages = (row["config"] or {}).get("stages") or []
        for position, entry in enumerate(stages):
            if not isinstance(entry, dict):
                continue
            source = stage_rows.get(entry.get("run_id"), entry)
            out.append(
                {
                    "experiment": row["experiment"],
                    "group": row["group"],
                    "run": run,
                    "seed": seed,
                    "params": row["params_label"],
                    "pipeline": row["pipeline"],
                    "position": position,
                    "stage": entry.get("stage"),
                    "run_id": entry.get("run_id"),
                    "status": entry.get("status"),
                    "shared": bool(entry.get("shared")),
                    "cost": cost_of(source, unit),
                    "overhead_hours": _overhead_hours(source),
                }
            )
    columns = ["experiment", "group", "run", "seed", "params", "pipeline", "position", "stage", "run_id", "status"]
    columns += ["shared", "cost"]
    columns.append("overhead_hours")
    return pd.DataFrame(out, columns=columns)


def _overhead_hours(row: dict[str, Any]) -> float:
    """A stage's overhead device-hours (NaN before the cost ledger: that row's cost includes it)."""
    value = row.get("overhead_device_seconds")
    return float("nan") if value is None or isnan(value) else float(value) / 3600.0


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
