"""Entry point: `streamlit run dashboard/app.py -- --results <local path or s3://bucket/prefix>`.

A read-only, multi-page view of the results store: which pipeline buys the most accuracy per unit of
training cost. The sidebar's filters and axes are shared by every page (see `ui.build_context`).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts only dashboard/ on the path; pages import `dashboard.*`
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import ui  # noqa: E402

# (file under views/, title, icon); the file name is the page's URL path
PAGES = (
    ("overview", "Overview", ":material/scatter_plot:"),
    ("pipelines", "Pipelines", ":material/stacked_bar_chart:"),
    ("sweeps", "Sweeps", ":material/grid_on:"),
    ("run_detail", "Run detail", ":material/description:"),
    ("experts", "Experts", ":material/hub:"),
)


def main() -> None:
    st.set_page_config(page_title="RMoE: accuracy vs training cost", page_icon=":material/insights:", layout="wide")
    args = ui.parse_args(sys.argv[1:])
    pages = [
        st.Page(f"views/{name}.py", title=title, icon=icon, url_path=name, default=i == 0)
        for i, (name, title, icon) in enumerate(PAGES)
    ]
    page = st.navigation(pages)
    ui.publish(ui.build_context(args.results))
    ui.run_guarded(page)


main()
