"""Streamlit glue shared by the entry point and the pages: arguments, store messages, sidebar filters,
the context the pages read, tables with CSV download, and the guard that turns errors into messages."""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import streamlit as st
from streamlit.navigation.page import StreamlitPage

from dashboard import data, processing
from dashboard.processing import COST_UNITS, CostUnit, Filters

LOG = logging.getLogger("rmoe.dashboard")
CONTEXT_KEY = "rmoe_dashboard_context"
DEFAULT_RESULTS = "runs/results"
HOW_TO_FILL = "Run an experiment to fill it: `python jobs/pipeline.py` (or `make demo`), then press **Reload results**."


@dataclass(frozen=True)
class Context:
    """What every page reads: the store's rows after the sidebar filters, and the chosen axes."""

    uri: str
    frame: pd.DataFrame
    metric: str | None
    unit: CostUnit


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dashboard/app.py", add_help=False)
    parser.add_argument(
        "--results",
        default=os.environ.get("RMOE_RESULTS", DEFAULT_RESULTS),
        help="results store: a local path or s3://bucket/prefix (S3 endpoint/credentials from AWS_* variables)",
    )
    args, _ = parser.parse_known_args(list(argv))
    return args


def build_context(uri: str) -> Context | None:
    """Load the store (showing why not, when it cannot be shown) and draw the shared sidebar."""
    st.sidebar.caption(f"Results store: `{uri}`")
    if st.sidebar.button("Reload results", help="Read the store again (it is cached for a minute)"):
        data.clear()
    try:
        loaded = data.load_results(uri)
    except data.LoadError as err:
        st.error(str(err))
        return None
    if loaded.skipped:
        st.warning(f"{len(loaded.skipped)} file(s) in the store could not be read and were skipped.")
        with st.expander("Skipped files"):
            st.code("\n".join(loaded.skipped), language=None)
    for warning in loaded.warnings:
        st.warning(warning)
    if not loaded.exists:
        st.info(f"There is no results store at `{loaded.uri}` yet. {HOW_TO_FILL}")
        return None
    if loaded.frame.empty:
        st.info(f"The results store at `{loaded.uri}` has no readable rows yet. {HOW_TO_FILL}")
        return None
    return _sidebar(loaded)


def _sidebar(loaded: data.Loaded) -> Context:
    options = processing.filter_options(loaded.frame)
    st.sidebar.header("Filters")
    filters = Filters(
        *(
            tuple(st.sidebar.multiselect(label, options[name], key=f"filter_{name}", placeholder="all"))
            for name, label in (
                ("experiments", "Experiment"),
                ("sweeps", "Sweep"),
                ("tasks", "Task"),
                ("models", "Model"),
            )
        )
    )
    frame = processing.apply_filters(loaded.frame, filters)
    st.sidebar.header("Axes")
    metrics = processing.metric_options(frame)
    metric = st.sidebar.selectbox("Metric", metrics, key="metric") if metrics else None
    unit_key = st.sidebar.selectbox(
        "Training cost", list(COST_UNITS), format_func=lambda k: COST_UNITS[k].label, key="cost_unit", index=3
    )
    return Context(loaded.uri, frame, metric, COST_UNITS[unit_key])


def publish(context: Context | None) -> None:
    st.session_state[CONTEXT_KEY] = context


def require() -> Context:
    """The page's context; stops the page (the entry point already said why) when there is none."""
    context = st.session_state.get(CONTEXT_KEY)
    if context is None:
        st.stop()
    if context.frame.empty:
        st.info("No rows match the filters in the sidebar.")
        st.stop()
    return context


def table(frame: pd.DataFrame, name: str, *, caption: str | None = None) -> None:
    """A table and its CSV download."""
    st.dataframe(frame, hide_index=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "table"
    st.download_button(
        f"Download {caption or name} as CSV",
        frame.to_csv(index=False).encode(),
        file_name=f"{slug}.csv",
        mime="text/csv",
        key=f"csv_{slug}",
        on_click="ignore",
    )


def run_guarded(page: StreamlitPage) -> None:
    """Run the selected page; an unexpected error becomes a message (logged in full on the server)."""
    try:
        page.run()
    except Exception as err:
        LOG.exception("dashboard page failed")
        st.error(f"This page could not be drawn: {type(err).__name__}: {err}")
