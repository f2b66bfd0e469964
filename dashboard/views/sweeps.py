"""Sweeps: metric and cost over two swept axes (num_experts × residual budget by default)."""

import streamlit as st

from dashboard import charts, processing, ui

ctx = ui.require()
st.title("Sweeps")
sweeps = sorted(ctx.frame["sweep_id"].dropna().astype(str).unique())
if not sweeps:
    st.info("No sweep trials under these filters. Rows of a sweep trial carry its `sweep_id` and `params`.")
    st.stop()
if ctx.metric is None:
    st.info("No trial of these sweeps has finished yet.")
    st.stop()
sweep = st.selectbox("Sweep", sweeps, key="sweep_id")
points = processing.overview(ctx.frame, ctx.metric, ctx.unit).points
trials = processing.sweep_trials(points, ctx.frame, sweep)
if trials.empty:
    st.info(f"No trial of sweep {sweep} reports {ctx.metric} yet.")
    st.stop()
axes = processing.swept_axes(trials)
if not axes:
    st.info("These trials carry no swept parameters.")
else:
    left, right = st.columns(2)
    x = left.selectbox("x axis", axes, key="sweep_x")
    y_options = [None, *[a for a in axes if a != x]]
    y = right.selectbox("y axis", y_options, index=min(1, len(y_options) - 1), key="sweep_y", format_func=str)
    x_order = processing.label_order(trials[x])
    y_order = processing.label_order(trials[y]) if y else []
    for value, title in (("metric", ctx.metric), ("cost", f"cost ({ctx.unit.label})")):
        cells = processing.sweep_pivot(trials, x, y, value)
        if cells.empty:
            st.caption(f"No trial has a {title}.")
            continue
        st.altair_chart(charts.heatmap(cells, x, y, title=title, x_order=x_order, y_order=y_order), width="stretch")
    st.caption("Each cell: the mean over the trials that differ only in the other swept parameters.")
ui.table(trials, f"sweep-{sweep}", caption="the trials")
