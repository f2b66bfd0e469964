"""Pure functions for a run's pages: its training history as curves (loss, lr, validation, MoE telemetry
per layer and expert), its telemetry table and its summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from dashboard.processing import JSON_COLUMNS, NOT_METRICS, isnan


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
    return [{k: None if isnan(v) else v for k, v in row.items()} for row in frame.to_dict("records")]


def has_moe(row: Mapping[str, Any]) -> bool:
    """Evidence that a stage trained MoE layers (downstream rows of MoE pipelines have no `num_experts`)."""
    if row.get("num_experts") is not None and not isnan(row.get("num_experts")):
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
    items = [(k, v) for k, v in row.items() if k not in skip and v is not None and not isnan(v)]
    return pd.DataFrame({"field": [k for k, _ in items], "value": [str(v) for _, v in items]})
