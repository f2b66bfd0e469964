"""Run detail: one stage run's status, error, checkpoint, config, metrics and curves over training."""

import streamlit as st

from dashboard import charts, lineage, runs, ui

ctx = ui.require()
st.title("Run detail")
stage_rows = runs.stage_runs(ctx.frame)
if stage_rows.empty:
    st.info("No stage runs under these filters.")
    st.stop()
records = runs.records(stage_rows)
index = st.selectbox(
    "Stage run", range(len(records)), format_func=lambda i: runs.run_label(records[i]), key="detail_run"
)
row = records[index]
status = row.get("status")
# a failed run is data, shown as a warning: st.error is kept for the page's own failures (the browser test)
(st.warning if status == "failed" else st.success if status == "succeeded" else st.info)(f"Status: {status}")
if isinstance(row.get("error"), str) and row["error"]:
    st.subheader("Error")
    st.code(row["error"], language=None)
st.markdown(f"**Checkpoint:** `{row.get('checkpoint_uri') or 'none'}`")
st.markdown("**Lineage:** " + " → ".join(f"`{s}`" for s in lineage.lineage(ctx.frame, row["run_id"])["stage"]))

history = runs.history_frame(row.get("history"))
st.subheader("Training curves")
groups = runs.curve_groups(history.columns)
if not groups:
    st.info("This row has no training history (rows written before histories were recorded have none).")
for name, keys in groups.items():
    st.altair_chart(charts.curves_chart(runs.curves(history, keys), title=name), width="stretch")
left, right = st.columns(2)
with left:
    st.subheader("Summary")
    ui.table(runs.run_summary(row), f"run-{row['run_id']}", caption="the summary")
with right:
    st.subheader("Final metrics")
    st.json(row.get("metrics") or {}, expanded=True)
    if row.get("params"):
        st.subheader("Swept parameters")
        st.json(row["params"])
st.subheader("Config")
st.json(row.get("config") or {}, expanded=False)
