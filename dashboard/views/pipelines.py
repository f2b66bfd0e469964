"""Pipelines: each pipeline's cost stage by stage (shared stages marked) and the lineage of its runs."""

import streamlit as st

from dashboard import charts, lineage, ui

ctx = ui.require()
st.title("Cost by stage")
breakdown = lineage.stage_breakdown(ctx.frame, ctx.unit)
if breakdown.empty:
    st.info("No pipeline summaries yet: each pipeline writes one when its last stage finishes.")
    st.stop()
runs = list(dict.fromkeys(breakdown["run"]))
labels = {r: " · ".join(p for p in r.split("|") if p) for r in runs}
run_key = st.selectbox("Experiment run", runs, format_func=labels.__getitem__, key="pipelines_group")
chosen = breakdown[breakdown["run"] == run_key]
st.altair_chart(charts.stage_bars(chosen, f"training cost ({ctx.unit.label})"), width="stretch")
st.caption(
    "Lighter bars: stages shared by several pipelines (trained once, charged in full to each). Bars are compute "
    "cost; overhead_hours is each stage's start-up, checkpoint and teardown time x devices, apart from it."
)
ui.table(chosen.drop(columns=["group", "run"]), "stage-costs", caption="stage costs")
st.subheader("Lineage")
st.graphviz_chart(lineage.lineage_dot(chosen))
run_ids = [r for r in dict.fromkeys(chosen.sort_values("position", ascending=False)["run_id"]) if r]
if run_ids:
    run = st.selectbox("Lineage of run", run_ids, key="pipelines_run")
    ui.table(lineage.lineage(ctx.frame, run), f"lineage-{run}", caption="this lineage")
