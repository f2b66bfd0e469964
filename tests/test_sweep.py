"""Sweeps end to end on a real local Ray: a 2x2 grid to completion, ASHA stopping a poor trial, and a
driver stopped by Ctrl-C, then killed, and resumed each time. The tests share one store and storage, so
the smoke preset's dense core trains once for all of them (the stage cache), as it would for a user's
successive sweeps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from processes import descendants

from rmoe_platform.results import ResultsStore
from rmoe_platform.sweep.config import SweepConfig
from rmoe_platform.sweep.driver import SweepDriver

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


def write_sweep(workspace: Path, name: str, *, relative: bool = False, **fields: Any) -> Path:
    """A sweep over the smoke preset writing under `workspace` (through paths relative to it, if asked)."""
    root = "." if relative else str(workspace)
    experiment = yaml.safe_load(SMOKE.read_text())
    experiment["storage"], experiment["results"] = f"{root}/ckpt", f"{root}/results"
    experiment["data"] = {"uri": f"{root}/data"}
    experiment.update(fields.pop("experiment", {}))
    sweep = {"name": name, "experiment": experiment, **fields}
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def rows(workspace: Path, **equals: Any) -> list[dict[str, Any]]:
    return ResultsStore(str(workspace / "results")).rows(**equals)


def test_a_2x2_sweep_runs_every_trial_on_one_dense_core(ray_local, workspace: Path, monkeypatch) -> None:
    # relative paths, as in the presets: trials run in Tune's own working directories and must still
    # share the driver's data, checkpoints and results
    monkeypatch.chdir(workspace)
    path = write_sweep(
        workspace,
        "grid",
        relative=True,
        pipeline="rmoe_d",
        space={"num_experts": {"grid": [2, 4]}, "residual_budget": {"grid": [{"steps": 1}, {"steps": 2}]}},
        scheduler={"type": "none"},
    )
    lines: list[str] = []
    report = SweepDriver(SweepConfig.load(path), log=lines.append).run()
    assert report.ok and len(report.rows) == 4
    trials = rows(workspace, row_type="pipeline", sweep_id="grid")
    assert len(trials) == 4 and all(r["status"] == "succeeded" for r in trials)
    settings = {
        (json.loads(r["params"])["num_experts"], json.dumps(json.loads(r["params"])["residual_budget"])) for r in trials
    }
    assert settings == {(n, json.dumps({"steps": s})) for n in (2, 4) for s in (1, 2)}
    assert {r["num_experts"] for r in trials} == {2, 4}
    dense = [r for r in rows(workspace, row_type="stage", stage="upstream_dense") if r["status"] == "succeeded"]
    assert len(dense) == 1, "the dense core trained once for the whole sweep"
    assert dense[0]["sweep_id"] == "grid" and dense[0]["shared"]
    for trial in trials:  # each trial is charged the shared dense stage, marked shared
        stages = json.loads(trial["config"])["stages"]
        assert [s["stage"] for s in stages] == ["upstream_dense", "rmoe_d/downstream"]
        assert stages[0]["run_id"] == dense[0]["run_id"] and stages[0]["shared"]
        assert trial["flops"] > dense[0]["flops"] and trial["dollars"] > dense[0]["dollars"]
    downstream = rows(workspace, row_type="stage", stage="rmoe_d/downstream", sweep_id="grid")
    assert len(downstream) == 4 and {r["budget_steps"] for r in downstream} == {1, 2}
    assert "Pareto-optimal settings (accuracy vs total dollars)" in report.table
    assert "Best setting per residual_budget" in report.table
    assert any("trial" in line and "finished (succeeded)" in line and "best so far" in line for line in lines)


def test_a_replicated_sweep_pairs_its_settings_by_seed(ray_local, workspace: Path) -> None:
    path = write_sweep(
        workspace,
        "seeds",
        pipeline="rmoe_d",
        experiment={"seeds": [0, 1]},
        space={"num_experts": {"grid": [2, 4]}},
        scheduler={"type": "none"},
    )
    report = SweepDriver(SweepConfig.load(path), log=lambda _: None).run()
    assert report.ok and len(report.rows) == 4
    trials = rows(workspace, row_type="pipeline", sweep_id="seeds")
    assert sorted((json.loads(r["params"])["num_experts"], r["seed"]) for r in trials) == [
        (2, 0), (2, 1), (4, 0), (4, 1),
    ]  # fmt: skip
    cores = {r["seed"]: r["run_id"] for r in rows(workspace, row_type="stage", stage="upstream_dense")}
    assert set(cores) == {0, 1}, "one dense core per seed"
    for trial in trials:  # each replicate starts from its own seed's core
        assert json.loads(trial["config"])["stages"][0]["run_id"] == cores[trial["seed"]]
    assert "    2  " in report.table, "each setting is one entry, the mean of its 2 seeds"


def test_asha_stops_a_clearly_worse_trial_early(ray_local, workspace: Path) -> None:
    # Downstream on the upstream data and classes: the dense core is already good there. Experts
    # initialised as core + 1e-3 noise keep that; with noise 30x the weights they are wrecked from the
    # start and a small learning rate cannot repair them. ASHA compares the two at each epoch.
    upstream_data = yaml.safe_load(SMOKE.read_text())["upstream"]["data"]
    path = write_sweep(
        workspace,
        "asha",
        pipeline="rmoe_d",
        experiment={
            "downstream": {"data": upstream_data, "budget": {"epochs": 4}, "optim": {"lr": 1e-5}},
        },
        space={"init_noise": {"grid": [1e-3, 30.0, 2e-3]}},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        max_concurrent_trials=1,
    )
    lines: list[str] = []
    report = SweepDriver(SweepConfig.load(path), log=lines.append).run()
    by_noise = {json.loads(r["params"])["init_noise"]: r for r in report.rows}
    good, bad = by_noise[1e-3], by_noise[30.0]
    assert by_noise[2e-3]["status"] == "succeeded", "the stopped trial's workers gave their CPUs back"
    assert good["status"] == "succeeded" and bad["status"] == "stopped", lines
    assert bad["metric"] < good["metric"] - 0.1
    assert "stopped early by ASHA after 1 evaluation" in bad["error"]
    good_stage = rows(workspace, row_type="stage", stage="rmoe_d/downstream", sweep_id="asha", params=good["params"])
    assert len(good_stage) == 1 and good_stage[0]["budget_steps"] == 16, "the good trial ran its 4 epochs"
    assert bad["device_seconds"] > 0 and bad["dollars"] > 0, "the stopped trial is charged what it used"
    assert any("stopped early by ASHA" in line for line in lines)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_after_trials(command: list[str], env: dict[str, str], workspace: Path, trials: int, how: str) -> str:
    """Run the sweep until `trials` trials have their row, then stop its driver: Ctrl-C (SIGINT to the
    driver's process group, as a terminal sends it) or a kill (SIGKILL, as when its pod is lost); returns
    the driver's output."""
    log_path = workspace / f"resume-{how}.log"
    log = log_path.open("w")
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[int] = []  # the driver's process tree, kept up to date: stopped whatever happens
    try:
        deadline = time.monotonic() + 420
        while len(rows(workspace, row_type="pipeline", sweep_id="resume")) < trials:
            started = descendants(driver.pid)
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1.0)
        started = descendants(driver.pid)
        if how == "ctrl-c":
            os.killpg(driver.pid, signal.SIGINT)
            assert driver.wait(timeout=60) == 130, log_path.read_text()[-3000:]
    finally:
        driver.kill()
        driver.wait(timeout=60)
        _kill(started)
        log.close()
    return log_path.read_text()


def test_a_sweep_stopped_by_ctrl_c_or_killed_resumes_without_rerunning_finished_trials(workspace: Path) -> None:
    path = write_sweep(
        workspace,
        "resume",
        pipeline="rmoe_d",
        space={"residual_budget": {"grid": [{"steps": 1}, {"steps": 2}, {"steps": 3}]}},
        scheduler={"type": "none"},
        max_concurrent_trials=1,
        # other experts than the 2x2 sweep's, so no trial finds its stage in the cache from that sweep
        experiment={"moe": {"num_experts": 2, "top_k": 1, "layers": "every_other", "init_noise": 0.02}},
    )
    command = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    output = _stop_after_trials(command, env, workspace, 1, "ctrl-c")
    lines = [line for line in output.splitlines() if line.startswith("interrupted (SIGINT)")]
    assert len(lines) == 1 and f"{path} --resume`" in lines[0], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    finished_first = {r["run_id"] for r in rows(workspace, row_type="pipeline", sweep_id="resume")}
    assert len(finished_first) == 1, "stopped mid-way"

    _stop_after_trials([*command, "--resume"], env, workspace, 2, "kill")
    finished_before = {r["run_id"] for r in rows(workspace, row_type="pipeline", sweep_id="resume")}
    assert len(finished_before) == 2 and finished_first <= finished_before, "killed mid-way"
    stage_rows_before = {r["run_id"] for r in rows(workspace, row_type="stage", sweep_id="resume")}

    resumed = subprocess.run(
        [*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = rows(workspace, row_type="pipeline", sweep_id="resume")
    assert Counter(r["run_id"] for r in trials) == Counter({r: 1 for r in {t["run_id"] for t in trials}})
    assert len(trials) == 3 and all(r["status"] == "succeeded" for r in trials)
    assert finished_before <= {r["run_id"] for r in trials}
    downstream = rows(workspace, row_type="stage", stage="rmoe_d/downstream", sweep_id="resume")
    assert sorted(r["budget_steps"] for r in downstream) == [1, 2, 3], "each trial's stage ran exactly once"
    assert stage_rows_before <= {r["run_id"] for r in rows(workspace, row_type="stage", sweep_id="resume")}
    assert "Pareto-optimal settings" in resumed.stdout


def test_a_stopped_trial_row_outranks_the_failure_its_teardown_writes() -> None:
    """ASHA's stop tears the trial down mid-stage; its 'failed' row may land after the 'stopped' one."""
    from rmoe_platform.sweep.report import trial_rows

    def row(run_id: str, status: str) -> dict[str, Any]:
        return {"row_type": "pipeline", "sweep_id": "s", "run_id": run_id, "status": status}

    rows = [row("a", "stopped"), row("a", "failed"), row("b", "failed"), row("b", "succeeded"), row("c", "failed")]
    rows += [row("d", "failed"), row("d", "failed"), {**row("e", "succeeded"), "sweep_id": "other"}]
    assert {r["run_id"]: r["status"] for r in trial_rows(rows, "s")} == {
        "a": "stopped",
        "b": "succeeded",
        "c": "failed",
        "d": "failed",
    }
