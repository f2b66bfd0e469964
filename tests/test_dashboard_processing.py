"""The dashboard's pure functions: Pareto frontier, cost units, references and ratios, aggregations,
tolerant parsing, histories, and the expert-weight analysis (cross-checked against rmoe)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from dashboard_store import (
    REPLICATES,
    full_rows,
    history,
    write_checkpoints,
    write_full_store,
    write_malformed_store,
)
from safetensors.numpy import load_file
from scipy import stats

from dashboard import charts, checkpoints, experts, lineage, processing, runs
from dashboard.processing import COST_UNITS
from rmoe_platform.results import ResultsStore


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    store = write_full_store(tmp_path_factory.mktemp("full"))
    parsed = processing.parse_rows(ResultsStore(str(store)).read().table)
    assert parsed.warnings == []
    return parsed.frame


def test_names_come_from_the_platform() -> None:
    """One source of truth: the dashboard uses the platform's own (torch-free) names, not copies."""
    from rmoe_platform import names
    from rmoe_platform.config import experiment

    assert processing.PIPELINES is names.PIPELINES and processing.METRIC_NAMES is names.METRIC_NAMES
    assert experiment.PIPELINES is names.PIPELINES and experiment.METRIC_NAMES is names.METRIC_NAMES


def test_pareto_mask_on_crafted_points() -> None:
    costs = [1.0, 2.0, 2.0, 3.0, 0.5, math.nan, 4.0, 1.0]
    metrics = [0.5, 0.7, 0.6, 0.7, 0.2, 0.99, 0.9, 0.5]
    # 0 front; 1 front (better than 0); 2 dominated by 1; 3 dominated by 1 (same metric, dearer);
    # 4 front (cheapest); 5 missing cost; 6 front (best); 7 duplicate of 0 (first kept)
    assert processing.pareto_mask(costs, metrics) == [True, True, False, False, True, False, True, False]
    assert processing.pareto_mask([], []) == []


@pytest.mark.parametrize(
    ("unit", "expected"),
    [("flops", 3e15), ("device_hours", 2.0), ("gpu_days", 0.25), ("dollars", 7.5)],
)
def test_cost_conversions(unit: str, expected: float) -> None:
    row = {"flops": 3e15, "device_seconds": 7200.0, "gpu_days": 0.25, "dollars": 7.5}
    assert processing.cost_of(row, COST_UNITS[unit]) == pytest.approx(expected)
    assert processing.costs(pd.DataFrame([row, row]), COST_UNITS[unit]).tolist() == pytest.approx([expected] * 2)
    assert math.isnan(processing.cost_of({unit: None, "device_seconds": None, "gpu_days": math.nan}, COST_UNITS[unit]))


def test_overview_references_ratios_and_marginal_cost(frame: pd.DataFrame) -> None:
    frame = processing.apply_filters(frame, processing.Filters(experiments=("exp-a",)))
    view = processing.overview(frame, "accuracy", COST_UNITS["device_hours"])
    plain = view.points[view.points["sweep_id"].isna()].set_index("pipeline")
    assert plain.loc["dense", "metric"] == 0.70, "the newer dense row supersedes the older one"
    assert len(view.points[(view.points["pipeline"] == "dense")]) == 1
    assert plain.loc["dense", "cost"] == pytest.approx(11.0)  # upstream 10 h + downstream 1 h
    assert plain.loc["moe", "cost"] == pytest.approx(31.2)
    assert plain.loc["rmoe_i", "delta_vs_dense"] == pytest.approx(0.08)
    assert plain.loc["rmoe_i", "cost_over_moe"] == pytest.approx(13.2 / 31.2)
    assert plain.loc["rmoe_i", "marginal_cost"] == pytest.approx(2.2)
    assert plain.loc["moe", "cost_over_moe"] == pytest.approx(1.0)
    assert math.isnan(plain.loc["upcycle", "metric"]) and not plain.loc["upcycle", "pareto"]
    assert view.notes and "not plotted" in view.notes[0]
    trials = view.points[view.points["sweep_id"] == "sw-1"]
    assert len(trials) == 5 and (trials["dense_metric"] == 0.70).all(), "trials fall back to the plain dense run"
    front = set(view.points.loc[view.points["pareto"], "run_id"])
    # the stopped trial (0.95 at 12.4 h) would dominate most of these: it is listed, never on the frontier
    assert front == {"exp-a-dense-0", "exp-a-rmoe_d-0", "exp-a-rmoe_i-e4-s12", "exp-a-rmoe_i-0", "exp-a-moe-0"}
    assert view.points.loc[view.points["run_id"] == "exp-a-rmoe_i-e8-s24", "status"].item() == "stopped"
    assert any("never on the frontier" in note for note in view.notes)
    marginal = processing.overview(frame, "accuracy", COST_UNITS["device_hours"], marginal=True).points
    assert marginal.loc[marginal["run_id"] == "exp-a-dense-0", "x"].item() == 0.0


def test_metric_choice_reaches_final_stage_metrics(frame: pd.DataFrame) -> None:
    assert processing.metric_options(frame) == ["accuracy", "mIoU", "aAcc"]
    view = processing.overview(frame, "aAcc", COST_UNITS["dollars"])
    assert sorted(view.points["metric"]) == [0.80, 0.85]
    assert set(view.points["experiment"]) == {"exp-seg"}
    table = processing.paper_table(view.points, "aAcc", COST_UNITS["dollars"])
    assert list(table["pipeline"]) == ["dense", "rmoe_i"] and "cost (dollars)" in table.columns
    assert list(table["core"]) == ["trained", "imported"]
    assert table.loc[1, "Δ vs dense"] == pytest.approx(0.05)


def test_filters(frame: pd.DataFrame) -> None:
    options = processing.filter_options(frame)
    assert options["experiments"] == ["exp-a", "exp-rep", "exp-seg"] and options["sweeps"] == [
        processing.NO_SWEEP,
        "sw-1",
    ]
    assert options["tasks"] == ["classification", "segmentation"]
    only_seg = processing.apply_filters(frame, processing.Filters(tasks=("segmentation",)))
    assert set(only_seg["experiment"]) == {"exp-seg"}
    sweep = processing.apply_filters(frame, processing.Filters(sweeps=("sw-1",)))
    assert set(sweep["sweep_id"]) == {"sw-1"}
    plain = processing.apply_filters(frame, processing.Filters(sweeps=(processing.NO_SWEEP,)))
    assert plain["sweep_id"].isna().all() and len(plain) == len(frame) - 14
    assert len(processing.apply_filters(frame, processing.Filters())) == len(frame)


def test_stage_breakdown_and_lineage(frame: pd.DataFrame) -> None:
    breakdown = lineage.stage_breakdown(frame, COST_UNITS["gpu_days"])
    rmoe_i = breakdown[(breakdown["group"] == "exp-a||") & (breakdown["pipeline"] == "rmoe_i")]
    assert list(rmoe_i["stage"]) == ["upstream_dense", "rmoe_i/residual", "rmoe_i/downstream"]
    assert list(rmoe_i["shared"]) == [True, False, False]
    assert rmoe_i["cost"].sum() == pytest.approx(13.2 / 24), "GPU-days come from the stage rows"
    summed = breakdown.groupby(["group", "pipeline"])["cost"].sum()
    points = processing.overview(frame, "accuracy", COST_UNITS["gpu_days"]).points.set_index(["group", "pipeline"])
    for key, cost in summed.items():
        if key[0].startswith("exp-a|"):  # exp-seg reports mIoU, not accuracy
            assert points.loc[key, "cost"] == pytest.approx(cost), key
    chain = lineage.lineage(frame, "rmoe_i-down")
    assert list(chain["run_id"]) == ["up-dense", "res-i", "rmoe_i-down"]
    assert list(lineage.lineage(frame, "nowhere")["stage"]) == ["(not in the store)"]
    replicated = breakdown[breakdown["experiment"] == "exp-rep"]
    assert sorted(set(replicated["run"])) == ["exp-rep|||seed 0", "exp-rep|||seed 1", "exp-rep|||seed 2"]
    one_run = replicated[replicated["run"] == "exp-rep|||seed 1"]
    assert sorted(one_run["pipeline"]) == ["dense", "moe", "rmoe_i"], "a seed's pipelines, not the sum of seeds"
    dot = lineage.lineage_dot(breakdown[breakdown["group"] == "exp-a||"])
    assert dot.count('"up-dense" [') == 1, "a shared stage is drawn once"
    assert '"up-dense" -> "res-i"' in dot and "fillcolor" in dot


def test_sweep_trials_and_pivots(frame: pd.DataFrame) -> None:
    points = processing.overview(frame, "accuracy", COST_UNITS["dollars"]).points
    trials = processing.sweep_trials(points, frame, "sw-1")
    assert len(trials) == 5 and processing.swept_axes(trials) == ["num_experts", "residual_budget"]
    assert trials.loc[trials["num_experts"] == "8", "status"].item() == "stopped"
    assert sorted(trials["residual_budget"].unique()) == ['{"steps":12}', '{"steps":24}']
    cells = processing.sweep_pivot(trials, "num_experts", "residual_budget", "metric")
    cell = cells[(cells["num_experts"] == "4") & (cells["residual_budget"] == '{"steps":24}')]
    assert cell["value"].item() == pytest.approx(0.764) and cell["trials"].item() == 1
    by_experts = processing.sweep_pivot(trials, "num_experts", None, "cost")
    assert by_experts.set_index("num_experts")["trials"].to_dict() == {"2": 2, "4": 2}, "no cell of stopped trials"
    assert processing.label_order(["10", "9", "null", "abc", "2.5"]) == ["2.5", "9", "10", "abc", "null"]


def test_replicates_are_one_point_with_intervals_and_the_frontier_is_over_means(frame: pd.DataFrame) -> None:
    frame = processing.apply_filters(frame, processing.Filters(experiments=("exp-rep",)))
    view = processing.overview(frame, "accuracy", COST_UNITS["dollars"])
    points = view.points.set_index("pipeline")
    assert len(points) == 3, "one point per pipeline, over its seeds (the stale seed-0 dense row superseded)"
    for pipeline, by_seed in REPLICATES.items():
        metrics = [metric for metric, _ in by_seed.values()]
        dollars = [cost for _, cost in by_seed.values()]
        expected = stats.ttest_1samp(metrics, 0.0).confidence_interval(0.95)
        point = points.loc[pipeline]
        assert point["seeds"] == 3 and point["seed_list"] == "0, 1, 2"
        assert point["metric"] == pytest.approx(np.mean(metrics))
        assert (point["metric_low"], point["metric_high"]) == (
            pytest.approx(expected.low),
            pytest.approx(expected.high),
        )
        assert point["cost"] == pytest.approx(np.mean(dollars)) and point["x_low"] < point["cost"] < point["x_high"]
    rmoe, dense = REPLICATES["rmoe_i"], REPLICATES["dense"]
    paired = stats.ttest_rel([rmoe[s][0] for s in rmoe], [dense[s][0] for s in rmoe]).confidence_interval(0.95)
    assert points.loc["rmoe_i", "delta_low"] == pytest.approx(paired.low)
    assert points.loc["rmoe_i", "delta_high"] == pytest.approx(paired.high)
    assert bool(points.loc["rmoe_i", "delta_distinguishable"]) == (paired.low > 0)
    # means: dense 0.71 at $1.0, rmoe_i 0.773 at $1.5, moe 0.813 at $4.2: all three on the frontier of means
    assert points["pareto"].all()
    table = processing.paper_table(view.points, "accuracy", COST_UNITS["dollars"]).set_index("pipeline")
    half = (points.loc["rmoe_i", "metric_high"] - points.loc["rmoe_i", "metric_low"]) / 2
    assert table.loc["rmoe_i", "accuracy ± (95% CI)"] == pytest.approx(half)
    assert table.loc["rmoe_i", "Δ 95% CI"] == f"[{paired.low:+.4f}, {paired.high:+.4f}]"


def test_overview_chart_draws_intervals_as_error_bars(frame: pd.DataFrame) -> None:
    frame = processing.apply_filters(frame, processing.Filters(experiments=("exp-rep",)))
    view = processing.overview(frame, "accuracy", COST_UNITS["dollars"])
    spec = charts.overview_chart(view.points, view.references, metric="accuracy", cost_title="cost").to_dict()
    datasets = spec["datasets"]
    rules = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule" and "y2" in layer["encoding"]]
    assert len(rules) == 1 and rules[0]["encoding"]["y"]["field"] == "metric_low"
    drawn = pd.DataFrame(datasets[rules[0]["data"]["name"]]).set_index("pipeline")
    points = view.points.set_index("pipeline")
    for pipeline in REPLICATES:
        assert drawn.loc[pipeline, "metric_low"] == pytest.approx(points.loc[pipeline, "metric_low"])
        assert drawn.loc[pipeline, "metric_high"] == pytest.approx(points.loc[pipeline, "metric_high"])
    across = [layer for layer in spec["layer"] if layer["mark"]["type"] == "rule" and "x2" in layer["encoding"]]
    assert len(across) == 1 and across[0]["encoding"]["x2"]["field"] == "x_high", "cost intervals too"


def test_labels_are_stable() -> None:
    assert processing.value_label({"steps": 24, "a": None}) == '{"a":null,"steps":24}'
    assert processing.value_label(0.5) == "0.5" and processing.value_label(None) == "null"
    assert processing.value_label(True) == "true" and processing.value_label(8) == "8"
    assert processing.params_label({"b": 1, "a": {"x": 2}}) == 'a={"x":2}, b=1'
    assert processing.params_label(None) == ""


def test_malformed_rows_become_warnings(tmp_path: Path) -> None:
    result = ResultsStore(str(write_malformed_store(tmp_path))).read()
    assert len(result.skipped) == 1 and "not-parquet" in result.skipped[0]
    parsed = processing.parse_rows(result.table)
    text = " ".join(parsed.warnings)
    for column in ("config", "history", "params", "metrics"):
        assert f"`{column}`" in text
    frame = parsed.frame
    assert frame.loc[frame["run_id"] == "dense-down", "config"].item() is None
    view = processing.overview(frame, "accuracy", COST_UNITS["dollars"])
    assert view.notes, "the pipeline row without metric/cost is listed, not plotted"
    assert lineage.stage_breakdown(frame, COST_UNITS["dollars"]) is not None


def test_history_curves_and_loads() -> None:
    records = history()
    wide = runs.history_frame(records)
    assert list(wide["step"]) == list(range(2, 21, 2))
    groups = runs.curve_groups(wide.columns)
    assert groups["loss"] == ["loss", "task_loss", "aux_loss", "val_loss"] and groups["validation"] == ["val_accuracy"]
    long = runs.curves(wide, groups["validation"])
    assert list(long["step"]) == [10, 20], "only the reports that evaluated"
    assert runs.moe_layers(wide.columns) == ["blocks.1.mlp"]
    loads = runs.expert_loads(wide, "blocks.1.mlp")
    assert sorted(loads["expert"].unique()) == [0, 1, 2, 3]
    assert loads.groupby("step")["fraction"].sum().to_numpy() == pytest.approx(np.ones(10))
    stats = runs.layer_stats(wide, "blocks.1.mlp", ["router_entropy"])
    assert set(stats["series"]) == {"router_entropy"} and len(stats) == 10
    assert runs.history_frame(None).empty
    table = runs.telemetry_table({"moe/a.1/router_entropy": 1.0, "moe/a.1/load_0": 0.5, "other": 1})
    assert table.to_dict("records") == [{"layer": "a.1", "router_entropy": 1.0}]
    assert runs.moe_layers(["moe/layers.10.mlp/x", "moe/layers.2.mlp/x"]) == ["layers.2.mlp", "layers.10.mlp"]


def test_empty_store_parses_to_an_empty_frame() -> None:
    from rmoe_platform.results import SCHEMA

    parsed = processing.parse_rows(SCHEMA.empty_table())
    assert parsed.frame.empty and parsed.warnings == []
    assert processing.overview(parsed.frame, "accuracy", COST_UNITS["dollars"]).points.empty
    assert lineage.stage_breakdown(parsed.frame, COST_UNITS["dollars"]).empty
    assert processing.metric_options(parsed.frame) == []


def test_expert_runs_put_inspectable_moe_stages_first(frame: pd.DataFrame) -> None:
    rows = runs.expert_runs(frame)
    assert [r["run_id"] for r in rows[:2]] == ["rmoe_i-down", "res-i"], "MoE, checkpoint and MoE history"
    assert all(r["status"] == "succeeded" for r in rows)
    assert all(v is None or v == v for r in rows for v in r.values() if isinstance(v, float)), "no NaN"


def test_has_moe_and_run_helpers() -> None:
    rows = {r["run_id"]: r for r in full_rows({"dense": "d", "residual": "r", "plain": "p"})}
    assert runs.has_moe(rows["res-i"]) and runs.has_moe(rows["rmoe_i-down"])
    assert not runs.has_moe(rows["up-dense"]) and not runs.has_moe(rows["dense-down"])
    summary = runs.run_summary({"run_id": "x", "metric": math.nan, "config": {}, "status": "ok"})
    assert summary["field"].tolist() == ["run_id", "status"]


def test_checkpoint_reader_matches_safetensors(tmp_path: Path) -> None:
    uris = write_checkpoints(tmp_path)
    path = checkpoints.model_path(uris["residual"])
    tensors = checkpoints.expert_tensors(pafs.LocalFileSystem(), path)
    reference = load_file(path)
    assert "blocks.1.mlp.router.gate.weight" not in tensors and "blocks.1.mlp.experts.core_b1_H" not in tensors
    assert tensors and all(np.array_equal(tensors[k], reference[k]) for k in tensors)
    parent = checkpoints.dense_mlp_tensors(
        pafs.LocalFileSystem(), checkpoints.model_path(uris["dense"]), ["blocks.1.mlp"]
    )
    assert sorted(parent) == ["blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"]


def test_checkpoint_reader_widens_bf16(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"x.experts.w1_EDH": {"dtype": "BF16", "shape": [1, 1, 3], "data_offsets": [0, len(raw)]}})
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + raw)
    out = checkpoints.expert_tensors(pafs.LocalFileSystem(), str(path))
    assert out["x.experts.w1_EDH"].dtype == np.float32 and out["x.experts.w1_EDH"].ravel().tolist() == values.tolist()
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoints.expert_tensors(pafs.LocalFileSystem(), str(path))


def test_norm_ratios_agree_with_rmoe_and_pca_keeps_distances() -> None:
    import torch

    from rmoe import ResidualExperts

    torch.manual_seed(0)
    module = ResidualExperts(torch.randn(8, 16), None, torch.randn(16, 8), None, 3, init_noise=0.3)
    tensors = {f"blocks.1.mlp.experts.{k}": v.detach().numpy() for k, v in module.state_dict().items()}
    layers = experts.layer_experts(tensors)
    ratios = experts.norm_ratios(layers)
    assert ratios["ratio"].to_numpy() == pytest.approx(module.residual_norm_ratio().numpy(), rel=1e-5)
    assert set(ratios["reference"]) == {"core θ⁰"}
    two = [experts.LayerExperts("l", layers[0].experts[:2], layers[0].core, "core θ⁰")]
    pca = experts.pca_around_core(two)
    core = pca[pca["kind"] == "core"]
    assert (core[["pc1", "pc2"]].to_numpy() == 0).all()
    coords = pca[pca["kind"] == "expert"][["pc1", "pc2"]].to_numpy()
    offsets = two[0].experts - two[0].core
    assert np.linalg.norm(coords, axis=1) == pytest.approx(np.linalg.norm(offsets, axis=1), rel=1e-4)
    assert pca["explained"].iloc[0] == pytest.approx(1.0)


def test_low_rank_and_plain_experts(tmp_path: Path) -> None:
    uris = write_checkpoints(tmp_path)
    fs = pafs.LocalFileSystem()
    residual = experts.layer_experts(checkpoints.expert_tensors(fs, checkpoints.model_path(uris["residual"])))
    assert [layer.layer for layer in residual] == ["blocks.1.mlp", "blocks.3.mlp"]
    assert residual[1].experts.shape == (4, 8 * 16 + 16 * 8), "low-rank residuals are materialised"
    plain_tensors = checkpoints.expert_tensors(fs, checkpoints.model_path(uris["plain"]))
    assert experts.layer_experts(plain_tensors)[0].reference == "expert mean"
    parent = checkpoints.dense_mlp_tensors(fs, checkpoints.model_path(uris["dense"]), ["blocks.1.mlp"])
    with_parent = experts.layer_experts(plain_tensors, parent)[0]
    assert with_parent.reference == "dense parent"
    assert experts.norm_ratios([with_parent])["ratio"].between(0.01, 0.5).all(), "upcycled: near the dense MLP"


def test_dashboard_imports_neither_ray_nor_torch(repo_root: Path) -> None:
    code = (
        "import sys; import dashboard.processing, dashboard.experts, dashboard.checkpoints, dashboard.charts, "
        "dashboard.data, dashboard.ui, dashboard.browser; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    hits = [p for p in (repo_root / "dashboard").rglob("*.py") if "import ray" in p.read_text()]
    assert not hits
