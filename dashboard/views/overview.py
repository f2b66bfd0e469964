"""Overview: the chosen metric against training cost per pipeline run, the Pareto frontier, the dense
and MoE baselines, and the paper's table (Δ metric vs dense, cost ÷ MoE)."""

import streamlit as st

from dashboard import charts, processing, ui

ctx = ui.require()
st.title("Accuracy versus training cost")
if ctx.metric is None:
    st.info("No pipeline summaries yet: each pipeline writes one when its last stage finishes.")
    st.stop()
left, right = st.columns([3, 1])
mode = left.radio("Cost", ["total", "marginal over dense"], horizontal=True, key="overview_mode")
log_x = right.checkbox("log scale", key="overview_log")
view = processing.overview(ctx.frame, ctx.metric, ctx.unit, marginal=mode != "total")
if view.points.empty:
    st.info(f"No pipeline run reports {ctx.metric} under these filters.")
    st.stop()
for note in view.notes:
    st.caption(note)
if log_x and (view.points["x"] <= 0).any():
    st.caption(f"{int((view.points['x'] <= 0).sum())} run(s) with a cost of 0 or less are left out of the log scale.")
cost_title = f"{'marginal ' if mode != 'total' else ''}training cost ({ctx.unit.label})"
chart = charts.overview_chart(view.points, view.references, metric=ctx.metric, cost_title=cost_title, log_x=log_x)
st.altair_chart(chart, width="stretch")
st.caption(
    "Frontier: the runs no other run beats on both cost and metric. Dashed lines: dense (lower bound) and "
    "MoE (upper bound) baselines. Shared stages are charged in full to every pipeline that uses them. Cost is "
    "compute (training + evaluation) only; start-up, checkpoint and teardown overhead is the table's own column "
    "(empty for runs recorded before the cost ledger, whose cost includes it)."
)
st.subheader("Comparison with the baselines")
ui.table(processing.paper_table(view.points, ctx.metric, ctx.unit), "overview", caption="this table")
