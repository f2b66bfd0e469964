"""Replicates: the statistics over seeds, and an experiment run once per seed end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.pipelines.replicates import ReplicatedRunner
from rmoe_platform.pipelines.report import format_replicates
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.results.replicates import interval, paired_difference

ROOT = Path(__file__).resolve().parents[1]


def test_interval_is_the_student_t_interval_of_the_mean() -> None:
    values = [0.71, 0.74, 0.69, 0.80]
    got = interval(values)
    assert got is not None
    expected = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert got.mean == pytest.approx(np.mean(values))
    assert got.std == pytest.approx(np.std(values, ddof=1))
    assert (got.low, got.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert got.n == 4 and got.excludes_zero


def test_one_value_has_no_spread_and_none_has_no_interval() -> None:
    one = interval([0.5, None, math.nan])
    assert one is not None and one.mean == 0.5 and one.n == 1
    assert math.isnan(one.std) and math.isnan(one.low) and not one.excludes_zero
    assert interval([]) is None


def test_paired_difference_pairs_by_seed_and_skips_unpaired_seeds() -> None:
    rmoe = {0: 0.80, 1: 0.705, 2: 0.745, 3: 0.9}
    dense = {0: 0.78, 1: 0.69, 2: 0.72, 3: None}  # seed 3's dense run failed: that seed is left out
    got = paired_difference(rmoe, dense)
    assert got is not None and got.n == 3
    expected = stats.ttest_rel([0.80, 0.705, 0.745], [0.78, 0.69, 0.72]).confidence_interval(0.95)
    assert (got.low, got.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    # unpaired, the seed-to-seed spread (0.70 .. 0.80) would swamp the +0.02 difference
    assert got.excludes_zero


def test_seeds_are_validated(tmp_path: Path) -> None:
    exp = ExperimentConfig.load(ROOT / "configs" / "smoke.yaml", ["seeds=[2, 5]"])
    assert exp.replicate_seeds == (2, 5) and exp.for_seed(5).seed == 5 and exp.for_seed(5).seeds == ()
    for bad, message in [("seeds=[1, 1]", "each seed once"), ("seeds=[-1]", "integers >= 0"), ("seeds=7", "a list")]:
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig.load(ROOT / "configs" / "smoke.yaml", [bad])
    with pytest.raises(ValueError, match="runs one seed"):
        ExperimentRunner(exp, ResultsStore(str(tmp_path / "results")))


@pytest.mark.slow
def test_two_seeds_of_the_smoke_preset_give_paired_per_seed_rows_and_their_summaries(ray_local, tmp_path: Path):
    overrides = [
        f"storage={tmp_path / 'ckpt'}",
        f"results={tmp_path / 'results'}",
        f"data.uri={tmp_path / 'data'}",
        "pipelines=[dense, rmoe_d]",
        "seeds=[0, 1]",
    ]
    exp = ExperimentConfig.load(ROOT / "configs" / "smoke.yaml", overrides)
    store = ResultsStore(exp.results)
    runner = ReplicatedRunner(exp, store, log=lambda _: None)
    runner.validate()
    report = runner.run()
    assert report.ok
    rows = store.read().table.to_pylist()
    upstream = [r for r in rows if r["row_type"] == "stage" and r["stage"] == "upstream_dense"]
    assert sorted(r["seed"] for r in upstream) == [0, 1], "one dense upstream per seed"
    assert len({r["config_hash"] for r in upstream}) == 2
    for seed in (0, 1):
        seed_rows = [r for r in rows if r["seed"] == seed]
        core = next(r for r in upstream if r["seed"] == seed)
        downstream = [r for r in seed_rows if r["row_type"] == "stage" and r["stage"].endswith("/downstream")]
        assert {r["parent_run_id"] for r in downstream} == {core["run_id"]}, "the seed's pipelines share its core"
    pipelines = {(r["pipeline"], r["seed"]): r for r in rows if r["row_type"] == "pipeline"}
    assert set(pipelines) == {(p, s) for p in ("dense", "rmoe_d") for s in (0, 1)}

    for summary in report.summaries():
        metric = [pipelines[(summary.pipeline, s)]["metric"] for s in (0, 1)]
        compute = [pipelines[(summary.pipeline, s)]["device_seconds"] for s in (0, 1)]
        half = stats.t.ppf(0.975, 1) * np.std(metric, ddof=1) / math.sqrt(2)
        assert summary.metric.mean == pytest.approx(np.mean(metric))
        assert summary.metric.std == pytest.approx(np.std(metric, ddof=1))
        assert (summary.metric.low, summary.metric.high) == (
            pytest.approx(np.mean(metric) - half),
            pytest.approx(np.mean(metric) + half),
        )
        assert summary.compute_seconds.mean == pytest.approx(np.mean(compute))
    rmoe_d = report.summary("rmoe_d")
    differences = [pipelines[("rmoe_d", s)]["metric"] - pipelines[("dense", s)]["metric"] for s in (0, 1)]
    assert rmoe_d.vs_dense.mean == pytest.approx(np.mean(differences))
    assert rmoe_d.vs_dense.std == pytest.approx(np.std(differences, ddof=1))
    assert report.summary("dense").vs_dense is None and rmoe_d.vs_moe is None
    table = format_replicates(report)
    assert f"{rmoe_d.vs_dense.mean:+.3f} [{rmoe_d.vs_dense.low:+.3f}, {rmoe_d.vs_dense.high:+.3f}]" in table
    assert "2 seeds (0, 1)" in table


def test_demo_seeds_is_the_demo_over_three_seeds() -> None:
    demo = ExperimentConfig.load(ROOT / "configs" / "demo.yaml")
    seeds = ExperimentConfig.load(ROOT / "configs" / "demo_seeds.yaml")
    assert seeds.replicate_seeds == (0, 1, 2)
    assert seeds.for_seed(0) == demo, "the same setting: `make demo`'s stages are seed 0's, found in the cache"
