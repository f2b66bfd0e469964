"""Experts: router statistics over training, ‖θʳ‖/‖θ⁰‖ per expert and the experts around their core."""

import streamlit as st

from dashboard import charts, data, lineage, runs, ui

ctx = ui.require()
st.title("Experts")
records = runs.expert_runs(ctx.frame)
if not records:
    st.info("No finished stage runs under these filters.")
    st.stop()
index = st.selectbox(
    "Stage run", range(len(records)), format_func=lambda i: runs.run_label(records[i]), key="experts_run"
)
row = records[index]

st.subheader("Routing over training")
history = runs.history_frame(row.get("history"))
layers = runs.moe_layers(history.columns)
if not layers:
    st.info("This run's history has no MoE telemetry (a dense stage, or a row from before histories).")
else:
    layer = st.selectbox("Layer", layers, key="experts_layer")
    loads = runs.expert_loads(history, layer)
    if not loads.empty:
        st.altair_chart(charts.load_chart(loads, title=f"{layer}: expert load"), width="stretch")
    for stat in ("dropped_fraction", "router_entropy", "max_load"):
        long = runs.layer_stats(history, layer, [stat])
        if not long.empty:
            st.altair_chart(charts.curves_chart(long, title=f"{layer}: {stat}"), width="stretch")
final = runs.telemetry_table(row.get("telemetry"))
if not final.empty:
    st.subheader("Final telemetry")
    ui.table(final, f"telemetry-{row['run_id']}", caption="the telemetry")

st.subheader("Expert weights")
uri = row.get("checkpoint_uri")
if not isinstance(uri, str) or not uri:
    st.info("This run has no checkpoint.")
    st.stop()
ancestors = lineage.lineage(ctx.frame, row["run_id"])["checkpoint_uri"].dropna().tolist()[:-1][::-1]
try:
    analysis = data.expert_analysis(uri, tuple(a for a in ancestors if isinstance(a, str)))
except data.LoadError as err:
    st.warning(str(err))
    st.stop()
if analysis.ratios.empty:
    st.info("This checkpoint has no MoE layers.")
    st.stop()
st.markdown(f"Reference point: **{analysis.ratios['reference'].iloc[0]}** · checkpoint `{uri}`")
st.altair_chart(charts.ratio_chart(analysis.ratios), width="content")
st.altair_chart(charts.pca_chart(analysis.pca), width="content")
st.caption(
    "PCA of each expert's weights minus the core (the core θ⁰ of residual layers; the dense parent's MLP "
    "or the experts' mean for plain experts), in weight units: the paper finds residual experts close to the core."
)
ui.table(analysis.ratios, f"ratios-{row['run_id']}", caption="the norm ratios")
