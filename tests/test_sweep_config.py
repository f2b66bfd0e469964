"""Sweep configs and search spaces (no Ray): bad input fails before any trial, the budget and the
concurrency arithmetic, and the closing Pareto tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rmoe_platform.cli import sweep as sweep_cli
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.results.analysis import pareto_front
from rmoe_platform.sweep.config import SweepConfig
from rmoe_platform.sweep.driver import SweepDriver, expected_trials, reuse_trial_actors
from rmoe_platform.sweep.plan import SEED_PARAM, representative_settings, trial_key
from rmoe_platform.sweep.report import best_per_budget, format_tables, pareto_rows, setting_rows
from rmoe_platform.sweep.space import parse_space

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def write_sweep(tmp_path: Path, **fields) -> Path:
    """A sweep file over the smoke preset, everything it writes under `tmp_path`."""
    experiment = yaml.safe_load(SMOKE.read_text())
    experiment["storage"], experiment["results"] = str(tmp_path / "ckpt"), str(tmp_path / "results")
    experiment["data"] = {"uri": str(tmp_path / "data")}
    sweep = {
        "name": "t",
        "experiment": experiment,
        "pipeline": "rmoe_i",
        "space": {"num_experts": {"grid": [2, 4]}, "residual_budget": {"grid": [{"steps": 2}, {"steps": 4}]}},
    }
    sweep.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def validate(path: Path) -> SweepDriver:
    driver = SweepDriver(SweepConfig.load(path), log=lambda _: None)
    driver.validate()
    return driver


def test_a_valid_sweep_plans_one_shared_dense_core(tmp_path: Path) -> None:
    plan = validate(write_sweep(tmp_path)).plan
    assert plan is not None and plan.shared_stages == {"upstream_dense"}
    trial = plan.trial({"num_experts": 4, "residual_budget": {"steps": 4}})
    assert trial.experiment.moe.num_experts == 4 and trial.experiment.intermediate.budget.steps == 4
    assert trial.experiment.pipelines == ("rmoe_i",)
    assert trial.key == trial_key({"residual_budget": {"steps": 4}, "num_experts": 4}), "key ignores order"
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists(), "validation writes nothing"


def test_a_replicated_sweep_runs_each_setting_once_per_seed(tmp_path: Path) -> None:
    experiment = yaml.safe_load(SMOKE.read_text())
    experiment.update(seeds=[0, 1], storage=str(tmp_path / "ckpt"), results=str(tmp_path / "results"))
    driver = validate(write_sweep(tmp_path, experiment=experiment))
    plan = driver.plan
    assert plan is not None and plan.seeds == (0, 1) and plan.shared_stages == {"upstream_dense"}
    assert plan.param_space()[SEED_PARAM] == {"grid_search": [0, 1]}
    assert expected_trials(driver.sweep) == 8, "2 x 2 settings x 2 seeds"
    setting = {"num_experts": 4, "residual_budget": {"steps": 4}}
    first, second = plan.trial({**setting, SEED_PARAM: 0}), plan.trial({**setting, SEED_PARAM: 1})
    assert first.params == second.params == setting, "replicates share their setting (the seed is apart)"
    assert (first.experiment.seed, second.experiment.seed) == (0, 1) and first.experiment.seeds == ()
    assert first.key != second.key and first.key.endswith("-s0") and second.key.endswith("-s1")
    (tmp_path / "one").mkdir()
    single = validate(write_sweep(tmp_path / "one")).plan
    assert single is not None and SEED_PARAM not in single.param_space(), "one seed: no seed dimension"


@pytest.mark.parametrize(
    ("scheduler", "reuse"), [({"type": "none"}, True), ({"type": "asha", "grace_period": 1}, False)]
)
def test_trial_processes_are_reused_unless_a_scheduler_stops_trials_early(tmp_path: Path, scheduler, reuse) -> None:
    assert reuse_trial_actors(SweepConfig.load(write_sweep(tmp_path, scheduler=scheduler))) is reuse


def test_budget_fraction_is_relative_to_the_upstream_samples(tmp_path: Path) -> None:
    # smoke: upstream 3 steps x batch 32 = 96 samples; the residual stage's batch is 32
    plan = validate(write_sweep(tmp_path, space={"residual_budget": {"grid": [{"fraction": 1.0}, {"steps": 1}]}})).plan
    assert plan is not None and plan.upstream_samples == 96
    assert plan.trial({"residual_budget": {"fraction": 1.0}}).experiment.intermediate.budget.steps == 3
    assert plan.fraction_to_steps(0.001) == 1, "never zero steps"
    rmoe_d = validate(write_sweep(tmp_path, pipeline="rmoe_d", space={"residual_budget": {"grid": [{"epochs": 1}, 3]}}))
    trial = rmoe_d.plan.trial({"residual_budget": 3})
    assert trial.experiment.downstream.budget.steps == 3, "rmoe_d trains its residual in the downstream stage"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"space": {}}, "empty search space"),
        ({"space": {"num_expert": {"grid": [2, 4]}}}, "unknown parameter 'num_expert'"),
        ({"space": {"moe.expert_dropout": {"grid": [0.1, 0.2]}}}, "moe.expert_dropout: unknown field"),
        ({"space": {"num_experts": {"between": [2, 4]}}}, "unknown distribution 'between'"),
        ({"space": {"num_experts": {"grid": []}}}, "non-empty list"),
        ({"space": {"num_experts": [2, 4]}}, "expected one of"),
        ({"space": {"aux_weight": {"loguniform": [0.0, 0.1]}}}, "low bound must be > 0"),
        ({"space": {"init_noise": {"uniform": [0.1, 0.01]}}, "search": {"algorithm": "random"}}, "low < high"),
        ({"space": {"residual_budget": {"grid": [{"steps": 0}]}}}, "budget steps must be a positive int, got 0"),
        ({"space": {"residual_budget": {"grid": [{"fraction": -0.5}]}}}, "budget fraction must be a positive"),
        ({"space": {"residual_budget": {"grid": [{"epochs": 1.5}]}}}, "budget epochs must be a positive int"),
        ({"space": {"residual_budget": {"randint": [0, 4]}}, "search": {"algorithm": "random"}}, "positive int, got 0"),
        ({"space": {"residual_budget": {"grid": [{"hours": 2}]}}}, "a budget must be one of"),
        ({"space": {"residual_budget": {"grid": [2]}}, "pipeline": "moe"}, "pipeline 'moe' has no residual stage"),
        ({"space": {"residual_rank": {"grid": [None, 4]}}, "pipeline": "upcycle"}, "changes nothing"),
        ({"space": {"top_k": {"grid": [1, 3]}}}, "top_k (3) must be <= num_experts (2)"),
        ({"space": {"top_k": {"choice": [1, 2]}}}, "grid search needs {grid: [...]}"),
        ({"space": {"top_k": {"grid": [1, 2]}}, "search": {"algorithm": "optuna"}}, "use choice instead of grid"),
        ({"pipeline": "rmoe_x"}, "pipeline: unknown 'rmoe_x'"),
        ({"search": {"algorithm": "bayes"}}, "unknown 'bayes'"),
        ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "reduction_factor must be > 1"),
        ({"cost": "watts"}, "cost: unknown 'watts'"),
    ],
)
def test_bad_sweeps_fail_before_any_trial(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(write_sweep(tmp_path, **fields))
    assert message in str(err.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "ckpt").exists()


def test_expert_parallel_size_must_divide_every_expert_count(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, space={"num_experts": {"grid": [2, 3]}})
    data = yaml.safe_load(path.read_text())
    data["experiment"]["moe_scaling"] = {"num_workers": 2, "expert_parallel_size": 2}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="3 experts cannot be sharded over expert_parallel_size=2"):
        validate(path)


def test_the_job_exits_2_on_a_bad_space_before_starting_ray(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, space={"residual_budget": {"grid": [{"steps": -1}]}})
    assert sweep_cli.main(["--config", str(path)]) == 2
    assert "budget steps must be a positive int, got -1" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    assert sweep_cli.main(["--config", str(write_sweep(tmp_path)), "--seeds", "0,0"]) == 2
    assert "seeds: each seed once" in capsys.readouterr().err
    assert sweep_cli.main(["--config", str(write_sweep(tmp_path)), "--seeds", "a"]) == 2
    assert "--seeds: expected comma-separated integers" in capsys.readouterr().err


def test_resume_without_a_sweep_and_a_rerun_of_an_existing_one_are_refused(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    with pytest.raises(ConfigError, match="no sweep 't' to resume"):
        SweepDriver(SweepConfig.load(path), resume=True, log=lambda _: None).validate()
    from rmoe_platform.results import ResultsStore

    ResultsStore(str(tmp_path / "results")).append([{"row_type": "pipeline", "run_id": "t-x", "sweep_id": "t"}])
    with pytest.raises(ConfigError, match=r"already exists .* pass --resume"):
        validate(path)


def test_representative_settings_cover_the_grid_or_each_value() -> None:
    space = parse_space({"num_experts": {"grid": [2, 4]}, "top_k": {"grid": [1, 2]}}, "rmoe_i")
    assert len(representative_settings(space)) == 4
    wide = parse_space({f"moe.{k}": {"choice": list(range(30))} for k in ("num_experts", "top_k")}, "rmoe_i")
    settings = representative_settings(wide)
    assert len(settings) == 60 and {s["moe.top_k"] for s in settings} == set(range(30))


def test_tune_domains_follow_the_space() -> None:
    space = parse_space(
        {"num_experts": {"grid": [2, 4]}, "aux_weight": {"loguniform": [1e-3, 1e-1]}, "top_k": {"randint": [1, 2]}},
        "rmoe_i",
    )
    domains = space.param_space()
    assert domains["num_experts"] == {"grid_search": [2, 4]}
    assert domains["aux_weight"].lower == pytest.approx(1e-3) and domains["aux_weight"].upper == pytest.approx(1e-1)
    assert domains["top_k"].upper == 3, "inclusive bounds become Tune's exclusive upper bound"


# ---- Pareto ------------------------------------------------------------------------------------------
def test_pareto_front_on_crafted_points() -> None:
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 0.5, float("nan")]
    metrics = [0.5, 0.7, 0.6, 0.65, 0.9, 0.2, 0.99]
    assert pareto_front(costs, metrics) == [5, 0, 1, 4]
    assert pareto_front(costs, metrics, maximize=False) == [5]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [0], "of duplicates, one"
    assert pareto_front([], []) == []
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def _row(key: str, metric: float | None, dollars: float, budget: dict, status: str = "succeeded") -> dict:
    params = {"num_experts": 2 if key in "ab" else 4, "residual_budget": budget}
    return {
        "row_type": "pipeline",
        "sweep_id": "s",
        "run_id": f"s-{key}",
        "status": status,
        "metric": metric,
        "dollars": dollars,
        "flops": dollars * 1e12,
        "device_seconds": dollars * 1e4,
        "params": json.dumps(params),
    }


def test_pareto_table_and_best_per_budget() -> None:
    small, large = {"steps": 8}, {"steps": 24}
    rows = [
        _row("a", 0.50, 1.0, small),
        _row("b", 0.62, 2.0, large),
        _row("c", 0.55, 1.2, small),
        _row("d", 0.60, 2.5, large),
        _row("e", 0.70, 3.0, large, status="stopped"),
    ]
    assert [r["run_id"] for r in pareto_rows(rows, "dollars")] == ["s-a", "s-c", "s-b"], "stopped trials are not on it"
    best = dict(best_per_budget(rows, "residual_budget"))
    assert best['{"steps":8}']["run_id"] == "s-c" and best['{"steps":24}']["run_id"] == "s-b"
    table = format_tables(rows, "dollars", "accuracy", "residual_budget")
    assert "5 trial(s): 1 stopped, 4 succeeded" in table and "Best setting per residual_budget" in table
    assert 'residual_budget={"steps":24}, num_experts=2' in table


def test_replicates_of_a_setting_are_one_entry_of_the_tables() -> None:
    small, large = {"steps": 8}, {"steps": 24}
    rows = [
        _row("a0", 0.50, 1.0, small),
        _row("a1", 0.56, 1.2, small),
        _row("a2", 0.53, 1.1, small),
        _row("b0", 0.60, 2.0, large),
        _row("b1", 0.90, 0.1, large, status="stopped"),  # a stopped replicate counts in no mean
    ]
    settings = {r["run_id"]: r for r in setting_rows(rows)}
    a, b = settings["s-a2"], settings["s-b0"]
    assert a["seeds"] == 3 and a["metric"] == pytest.approx(0.53) and a["dollars"] == pytest.approx(1.1)
    assert a["metric_half_width"] == pytest.approx(4.302653 * 0.03 / 3**0.5, rel=1e-5)
    assert b["seeds"] == 1 and b["metric"] == 0.60 and b["dollars"] == 2.0
    assert [r["run_id"] for r in pareto_rows(rows, "dollars")] == ["s-a2", "s-b0"]
    table = format_tables(rows, "dollars", "accuracy", "residual_budget")
    assert "0.530      0.075      3" in table


def test_optuna_samples_the_space_reproducibly(tmp_path: Path) -> None:
    from rmoe_platform.sweep.driver import search_algorithm
    from rmoe_platform.sweep.reporting import METRIC

    space = {
        "num_experts": {"choice": [2, 4]},
        "aux_weight": {"loguniform": [1e-3, 1e-1]},
        "residual_budget": {"randint": [1, 6]},
    }
    sweep = SweepConfig.load(write_sweep(tmp_path, space=space, search={"algorithm": "optuna", "num_samples": 8}))

    def suggestions() -> list[dict]:
        searcher = search_algorithm(sweep, concurrency=2)
        assert searcher.set_search_properties(METRIC, "max", sweep.search_space().param_space())
        return [searcher.suggest(f"t{i}") for i in range(4)]

    first = suggestions()
    assert first == suggestions(), "seeded: a resumed sweep proposes the same settings"
    for setting in first:
        assert setting["num_experts"] in (2, 4) and 1e-3 <= setting["aux_weight"] <= 1e-1
        assert 1 <= setting["residual_budget"] <= 6


def test_relative_paths_are_resolved_on_the_driver(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    sweep = SweepConfig.load(ROOT / "configs" / "sweeps" / "demo.yaml")
    exp = sweep.experiment
    assert exp.storage == str(tmp_path / "runs" / "checkpoints") and exp.results == str(tmp_path / "runs" / "results")
    name = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["upstream"]["data"]["uri"]  # a bare name
    assert exp.datasets()["experiment.upstream.data"].uri == str(tmp_path / "runs" / "data" / name)
    assert sweep.base_experiment.pipelines == ("rmoe_i",)
