"""The Streamlit dashboard over the results store: accuracy versus training cost, per pipeline.

`app.py` is the entry point (`streamlit run dashboard/app.py -- --results <uri>`); `views/` (the pages) are thin;
`processing.py`, `lineage.py`, `runs.py`, `experts.py` and `checkpoints.py` are pure (unit-tested without
Streamlit); `charts.py`
builds Altair charts; `data.py` caches loading; `ui.py` holds the shared page glue.
"""
