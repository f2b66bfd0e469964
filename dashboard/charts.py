"""Altair chart builders: each takes the tidy frames of `processing` / `experts` and returns a chart."""

from __future__ import annotations

import altair as alt
import pandas as pd

from dashboard.processing import FINISHED, PIPELINES

MAX_ROWS = 4000  # below Altair's 5000-row guard: long histories are thinned, never refused
BASELINE_COLORS = {"dense": "#6b6b6b", "moe": "#c0392b"}
# the overview points' columns a chart draws (the chart's data is serialised whole: nothing else is sent)
CHART_COLUMNS = ("pipeline", "experiment", "params", "run_id", "seeds", "metric", "metric_low", "metric_high")
CHART_COLUMNS += ("x", "x_low", "x_high", "pareto", "status")
STANDINGS = ("on the frontier", "dominated", "stopped or failed")


def _pipeline_scale(values: pd.Series) -> alt.Scale:
    present = [p for p in PIPELINES if p in set(values)] + sorted(set(values) - set(PIPELINES))
    return alt.Scale(domain=present, scheme="tableau10")


def overview_chart(
    points: pd.DataFrame, references: pd.DataFrame, *, metric: str, cost_title: str, log_x: bool = False
) -> alt.LayerChart:
    """Metric against cost per pipeline (the mean over its seeds), the 95% intervals as error bars in both
    directions where there are several seeds, the Pareto frontier over the means as a staircase, dense/MoE
    reference lines."""
    plotted = points.dropna(subset=["x", "metric"])[[c for c in CHART_COLUMNS if c in points]]
    plotted = plotted.assign(frontier=[_standing(row) for row in plotted.to_dict("records")])
    if log_x:
        plotted = plotted[plotted["x"] > 0]
    x = alt.X("x:Q", title=cost_title, scale=alt.Scale(type="log" if log_x else "linear", zero=False))
    y = alt.Y("metric:Q", title=metric, scale=alt.Scale(zero=False))
    tooltip = [
        alt.Tooltip("pipeline:N"),
        alt.Tooltip("experiment:N"),
        alt.Tooltip("params:N"),
        alt.Tooltip("metric:Q", format=".4f", title=f"{metric} (mean)"),
        alt.Tooltip("metric_low:Q", format=".4f", title="95% CI low"),
        alt.Tooltip("metric_high:Q", format=".4f", title="95% CI high"),
        alt.Tooltip("x:Q", title=cost_title, format=".4g"),
        alt.Tooltip("seeds:Q"),
        alt.Tooltip("run_id:N", title="latest run"),
    ]
    base = alt.Chart(plotted)
    dots = base.mark_point(filled=True, size=110, opacity=0.9).encode(
        x=x,
        y=y,
        color=alt.Color("pipeline:N", scale=_pipeline_scale(plotted["pipeline"]), title="pipeline"),
        shape=alt.Shape("frontier:N", title=None, scale=alt.Scale(domain=list(STANDINGS))),
        tooltip=tooltip,
    )
    front = (
        alt.Chart(plotted[plotted["pareto"]].sort_values("x"))
        .mark_line(interpolate="step-after", color="#222222", strokeDash=[4, 3], strokeWidth=1.5)
        .encode(x=x, y=y, order="x:Q")
    )
    layers: list[alt.Chart] = [front, *error_bars(plotted, x=x, y=y), dots]
    if not references.empty:
        refs = references.assign(label=references["pipeline"] + " " + references["experiment"].astype(str))
        rule = alt.Chart(refs).mark_rule(strokeDash=[2, 2], opacity=0.7)
        color = alt.Color(
            "pipeline:N",
            scale=alt.Scale(domain=list(BASELINE_COLORS), range=list(BASELINE_COLORS.values())),
            legend=None,
        )
        layers.append(rule.encode(y="metric:Q", color=color))
        text = alt.Chart(refs).mark_text(align="left", dx=4, dy=-6, fontSize=11)
        layers.append(text.encode(y="metric:Q", x=alt.value(0), text="label:N", color=color))
    return alt.layer(*layers).resolve_scale(color="independent").properties(height=440)


def _standing(point: dict) -> str:
    if point["pareto"]:
        return STANDINGS[0]
    return STANDINGS[1] if point["status"] in FINISHED else STANDINGS[2]


def error_bars(plotted: pd.DataFrame, *, x: alt.X, y: alt.Y) -> list[alt.Chart]:
    """The metric's (vertical) and the cost's (horizontal) 95% intervals of the points that have them."""
    color = alt.Color("pipeline:N", scale=_pipeline_scale(plotted["pipeline"]), legend=None)
    bars = []
    vertical = plotted.dropna(subset=["metric_low", "metric_high"])
    if not vertical.empty:
        bars.append(
            alt.Chart(vertical)
            .mark_rule(strokeWidth=1.5)
            .encode(x=x, y=alt.Y("metric_low:Q", scale=alt.Scale(zero=False)), y2="metric_high:Q", color=color)
        )
    horizontal = plotted.dropna(subset=["x_low", "x_high"])
    if not horizontal.empty:
        rule = alt.Chart(horizontal).mark_rule(strokeWidth=1.5)
        bars.append(rule.encode(x="x_low:Q", x2="x_high:Q", y=y, color=color))
    return bars


def stage_bars(breakdown: pd.DataFrame, cost_title: str) -> alt.Chart:
    """Each pipeline's cost stacked by stage; shared stages (trained once, charged to every user) hatched
    by a lighter opacity and named in the tooltip."""
    data = breakdown.assign(kind=breakdown["shared"].map({True: "shared", False: "own"}))
    return (
        alt.Chart(data)
        .mark_bar(stroke="#333333", strokeWidth=0.5)
        .encode(
            x=alt.X("pipeline:N", sort=list(PIPELINES), title=None),
            y=alt.Y("sum(cost):Q", title=cost_title),
            color=alt.Color("stage:N", title="stage"),
            opacity=alt.Opacity("kind:N", scale=alt.Scale(domain=["own", "shared"], range=[1.0, 0.45]), title=None),
            order=alt.Order("position:Q"),
            tooltip=["pipeline:N", "stage:N", "kind:N", "run_id:N", "status:N", alt.Tooltip("cost:Q", format=".4g")],
        )
        .properties(height=360)
    )


def heatmap(
    cells: pd.DataFrame, x: str, y: str | None, *, title: str, x_order: list[str], y_order: list[str]
) -> alt.Chart:
    """Mean `value` per cell of two swept axes (one when `y` is None), the value written in each cell."""
    enc_x = alt.X(f"{x}:O", sort=x_order, title=x, axis=alt.Axis(labelAngle=0))
    enc_y = alt.Y(f"{y}:O", sort=y_order, title=y) if y else alt.value(0)
    base = alt.Chart(cells).encode(x=enc_x, y=enc_y)
    rect = base.mark_rect().encode(
        color=alt.Color("value:Q", title=title, scale=alt.Scale(scheme="viridis")),
        tooltip=[x, *([y] if y else []), alt.Tooltip("value:Q", format=".4g"), "trials:Q"],
    )
    middle = float(cells["value"].min() + cells["value"].max()) / 2  # viridis is light above the middle
    ink = alt.condition(alt.datum.value > middle, alt.value("black"), alt.value("white"))
    text = base.mark_text(fontSize=12).encode(text=alt.Text("value:Q", format=".3g"), color=ink)
    return (rect + text).properties(title=title, height=60 if y is None else 300)


def curves_chart(long: pd.DataFrame, *, title: str, y_title: str = "value", log_y: bool = False) -> alt.Chart:
    """Multi-line chart of (step, series, value)."""
    data = _bounded(long)
    return (
        alt.Chart(data)
        .mark_line(point=len(data) < 200)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=y_title, scale=alt.Scale(type="log" if log_y else "linear", zero=False)),
            color=alt.Color("series:N", title=None),
            tooltip=["series:N", "step:Q", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(title=title, height=260)
    )


def load_chart(loads: pd.DataFrame, *, title: str) -> alt.Chart:
    """Each expert's share of the routed tokens over training, stacked to 1."""
    data = _bounded(loads)
    return (
        alt.Chart(data)
        .mark_area()
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("fraction:Q", stack="normalize", title="share of routed tokens"),
            color=alt.Color("expert:N", title="expert"),
            tooltip=["expert:N", "step:Q", alt.Tooltip("fraction:Q", format=".3f")],
        )
        .properties(title=title, height=260)
    )


def ratio_chart(ratios: pd.DataFrame) -> alt.Chart:
    """‖θₑ − core‖ / ‖core‖ per expert, one panel per layer."""
    return (
        alt.Chart(ratios)
        .mark_bar()
        .encode(
            x=alt.X("expert:O", title="expert"),
            y=alt.Y("ratio:Q", title="‖θʳ‖ / ‖θ⁰‖"),
            color=alt.Color("expert:N", legend=None),
            tooltip=["layer:N", "expert:O", alt.Tooltip("ratio:Q", format=".4f"), "reference:N"],
        )
        .properties(width=180, height=180)
        .facet(column=alt.Column("layer:N", title=None))
    )


def pca_chart(points: pd.DataFrame) -> alt.Chart:
    """The experts around their core in the plane of their two main directions, one panel per layer."""
    return (
        alt.Chart(points)
        .mark_point(filled=True, size=120)
        .encode(
            x=alt.X("pc1:Q", title="PC 1"),
            y=alt.Y("pc2:Q", title="PC 2"),
            shape=alt.Shape("kind:N", scale=alt.Scale(domain=["core", "expert"], range=["cross", "circle"])),
            color=alt.Color("point:N", title=None),
            tooltip=[
                "layer:N",
                "point:N",
                alt.Tooltip("pc1:Q", format=".3g"),
                alt.Tooltip("pc2:Q", format=".3g"),
                alt.Tooltip("explained:Q", format=".0%", title="spread in these 2 PCs"),
            ],
        )
        .properties(width=220, height=220)
        .facet(column=alt.Column("layer:N", title=None))
        .resolve_scale(x="independent", y="independent")
    )


def _bounded(long: pd.DataFrame) -> pd.DataFrame:
    """At most MAX_ROWS rows, keeping every series' points at evenly spaced steps."""
    if len(long) <= MAX_ROWS:
        return long
    steps = sorted(long["step"].unique())
    keep = set(steps[:: -(-len(long) // MAX_ROWS)])
    keep.add(steps[-1])
    return long[long["step"].isin(keep)]
