"""Every dashboard page under `streamlit.testing` (AppTest) on stores the tests write: full, empty,
missing, malformed and unreadable. No page may show an exception; each says what it could not show."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from dashboard_store import (
    FAILED_ERROR,
    full_rows,
    write_checkpoints,
    write_full_store,
    write_malformed_store,
    write_pre_ledger_store,
)
from streamlit.testing.v1 import AppTest

from dashboard import data
from rmoe_platform.results import ResultsStore

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
PAGES = ("overview", "pipelines", "sweeps", "run_detail", "experts")


@pytest.fixture(scope="module")
def full_store(tmp_path_factory) -> Path:
    return write_full_store(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture
def open_app(monkeypatch) -> Callable[[str], AppTest]:
    def run(results: str) -> AppTest:
        monkeypatch.setattr(sys, "argv", ["app.py", "--results", results])
        return AppTest.from_file(str(APP), default_timeout=60).run()

    return run


def visit(app: AppTest, page: str) -> AppTest:
    return app.switch_page(f"views/{page}.py").run()


def assert_clean(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def charts(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("vega_lite_chart")]


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def option_index(app: AppTest, key: str, run_id: str) -> int:
    return next(i for i, label in enumerate(app.selectbox(key=key).options) if label.endswith(f"· {run_id}"))


def test_overview_plots_frontier_and_baselines(full_store: Path, open_app) -> None:
    app = open_app(str(full_store))
    assert_clean(app)
    assert app.title[0].value == "Accuracy versus training cost"
    (spec,) = charts(app)
    marks = [layer["mark"]["type"] for layer in spec["layer"]]
    # frontier, error bars (metric, cost) of the replicated experiment, points, baseline rules and their labels
    assert marks == ["line", "rule", "rule", "point", "rule", "text"]
    table = app.dataframe[0].value
    assert {"Δ vs dense", "cost ÷ MoE", "Pareto", "cost (dollars)"} <= set(table.columns)
    assert set(table["pipeline"]) == {"dense", "moe", "rmoe_i", "rmoe_d", "upcycle"}
    assert app.get("download_button"), "every table has a CSV download"

    app.selectbox(key="metric").set_value("mIoU").run()
    app.selectbox(key="cost_unit").set_value("gpu_days").run()
    app.radio(key="overview_mode").set_value("marginal over dense").run()
    app.checkbox(key="overview_log").check().run()
    assert_clean(app)
    table = app.dataframe[0].value
    assert set(table["experiment"]) == {"exp-seg"} and "cost (GPU-days)" in table.columns
    assert charts(app)[0]["layer"][1]["encoding"]["x"]["title"] == "marginal training cost (GPU-days)"


def test_filters_narrow_every_page(full_store: Path, open_app) -> None:
    app = open_app(str(full_store))
    app.multiselect(key="filter_sweeps").set_value(["sw-1"]).run()
    assert_clean(app)
    assert len(app.dataframe[0].value) == 5, "only the sweep's trials"
    app.multiselect(key="filter_sweeps").set_value([]).run()
    app.multiselect(key="filter_tasks").set_value(["segmentation"]).run()
    assert_clean(app)
    assert app.selectbox(key="metric").options == ["mIoU", "aAcc"]


def test_pipelines_page_stacks_stage_costs_and_draws_lineage(full_store: Path, open_app) -> None:
    app = visit(open_app(str(full_store)), "pipelines")
    assert_clean(app)
    (spec,) = charts(app)
    assert spec["encoding"]["opacity"]["field"] == "kind", "shared stages are marked"
    assert app.get("graphviz_chart")
    stages = app.dataframe[0].value
    assert stages.loc[stages["stage"] == "upstream_dense", "shared"].all()
    app.selectbox(key="pipelines_run").set_value("rmoe_i-down").run()
    assert list(app.dataframe[1].value["run_id"]) == ["up-dense", "res-i", "rmoe_i-down"]


def test_sweeps_page_draws_heatmaps(full_store: Path, open_app) -> None:
    app = visit(open_app(str(full_store)), "sweeps")
    assert_clean(app)
    specs = charts(app)
    assert len(specs) == 2, "metric and cost"
    assert specs[0]["layer"][0]["encoding"]["x"]["field"] == "num_experts"
    assert specs[0]["layer"][0]["encoding"]["y"]["field"] == "residual_budget"
    app.selectbox(key="sweep_y").set_value(None).run()
    assert_clean(app)
    assert len(charts(app)) == 2
    assert len(app.dataframe[0].value) == 5


def test_run_detail_shows_curves_and_failures(full_store: Path, open_app) -> None:
    app = visit(open_app(str(full_store)), "run_detail")
    assert_clean(app)
    app.selectbox(key="detail_run").set_value(option_index(app, "detail_run", "rmoe_i-down")).run()
    assert_clean(app)
    titles = [spec.get("title") for spec in charts(app)]
    assert titles == ["loss", "validation", "learning rate"]
    assert "`upstream_dense` → `rmoe_i/residual` → `rmoe_i/downstream`" in texts(app.markdown)
    app.selectbox(key="detail_run").set_value(option_index(app, "detail_run", "upc-down")).run()
    assert not app.exception
    assert app.warning[0].value == "Status: failed"
    assert app.code[0].value == FAILED_ERROR
    assert "no training history" in texts(app.info)


def test_experts_page_reads_checkpoints(full_store: Path, open_app) -> None:
    app = visit(open_app(str(full_store)), "experts")
    assert_clean(app)
    app.selectbox(key="experts_run").set_value(option_index(app, "experts_run", "res-i")).run()
    assert_clean(app)
    specs = charts(app)
    titles = [s.get("title") for s in specs[:4]]
    assert titles == [f"blocks.1.mlp: {t}" for t in ("expert load", "dropped_fraction", "router_entropy", "max_load")]
    assert len(specs) == 6, "loads, three router statistics, norm ratios, PCA"
    assert "core θ⁰" in texts(app.markdown)
    ratios = app.dataframe[-1].value
    assert set(ratios["layer"]) == {"blocks.1.mlp", "blocks.3.mlp"} and (ratios["ratio"] > 0).all()

    app.selectbox(key="experts_run").set_value(option_index(app, "experts_run", "upc-int")).run()
    assert_clean(app)
    assert "dense parent" in texts(app.markdown), "upcycled experts are centred on their dense parent"
    app.selectbox(key="experts_run").set_value(option_index(app, "experts_run", "rmoe_d-down")).run()
    assert_clean(app)
    assert "no checkpoint" in texts(app.info)


@pytest.mark.parametrize("page", PAGES)
def test_empty_store(tmp_path: Path, open_app, page: str) -> None:
    (tmp_path / "results").mkdir()
    app = visit(open_app(str(tmp_path / "results")), page)
    assert_clean(app)
    assert "no readable rows" in texts(app.info) and "jobs/pipeline.py" in texts(app.info)


def test_missing_store(tmp_path: Path, open_app) -> None:
    app = open_app(str(tmp_path / "nowhere"))
    assert_clean(app)
    assert "There is no results store" in texts(app.info) and "jobs/pipeline.py" in texts(app.info)
    assert_clean(visit(app, "experts"))


@pytest.mark.parametrize("page", PAGES)
def test_malformed_store(tmp_path: Path, open_app, page: str) -> None:
    app = visit(open_app(str(write_malformed_store(tmp_path))), page)
    assert_clean(app)
    warnings = texts(app.warning)
    assert "could not be read and were skipped" in warnings
    assert "unreadable `history` JSON" in warnings and "unreadable `config` JSON" in warnings
    assert app.title, "the page still draws"


def test_store_and_checkpoints_on_s3(s3_server, tmp_path: Path, open_app, monkeypatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    data.s3_access.clear()  # resolved from this environment, not a previous test's
    access, bucket = s3_server.access(), s3_server.bucket()
    uris = {}
    for name, folder in write_checkpoints(tmp_path).items():
        target = f"{bucket}/checkpoints/{name}"
        pafs.copy_files(folder, target, destination_filesystem=access.filesystem())
        uris[name] = f"s3://{target}"
    store = f"s3://{bucket}/results"
    ResultsStore(store, s3=access).append(full_rows(uris))
    try:
        app = open_app(store)
        assert_clean(app)
        assert len(charts(app)) == 1 and len(app.dataframe[0].value) == 13
        app = visit(app, "experts")
        app.selectbox(key="experts_run").set_value(option_index(app, "experts_run", "upc-int")).run()
        assert_clean(app)
        assert "dense parent" in texts(app.markdown), "expert and parent weights read from S3"
    finally:
        data.s3_access.clear()


def test_an_unexpected_page_error_is_a_message(full_store: Path, open_app, monkeypatch) -> None:
    from dashboard import lineage

    def broken(*args, **kwargs):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(lineage, "stage_breakdown", broken)
    app = visit(open_app(str(full_store)), "pipelines")
    assert not app.exception
    assert app.error[0].value == "This page could not be drawn: RuntimeError: synthetic failure"


@pytest.mark.parametrize("page", PAGES)
def test_a_store_from_before_the_cost_ledger_shows_on_every_page(tmp_path: Path, open_app, page: str) -> None:
    """Schema-2 rows (no overhead, utilisation or ledger columns) load on every page; the overhead column of
    the paper's table is empty for them."""
    app = visit(open_app(str(write_pre_ledger_store(tmp_path))), page)
    assert_clean(app)
    if page == "overview":
        table = app.dataframe[0].value
        assert "overhead (device-hours)" in table.columns and table["overhead (device-hours)"].isna().all()
