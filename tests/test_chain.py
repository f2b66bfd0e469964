"""A pipeline's consecutive stages train in one fit (one worker group, one Ray Train start): checkpoints name
the stage they belong to, a restarted fit goes on from the stage that was training, a stage that fails
leaves the ones before it finished and recorded, and each stage keeps its own newest checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_faults import write_checkpoint
from test_pipelines import smoke

from rmoe_platform.config.stage import FaultInjection
from rmoe_platform.pipelines.resume import find_resume_point, run_prefix
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.stage.checkpoint_names import (
    CheckpointName,
    checkpoint_dir_name,
    owner_prefix,
    parse_checkpoint_dir,
    restart_point,
)
from rmoe_platform.stage.retention import prune_checkpoints
from rmoe_platform.stage.run import ChainLink, ChainResult, run_chain
from rmoe_platform.stage.worker.checkpoints import MODEL_FILE
from rmoe_platform.storage.s3 import S3Access


# ---- names ---------------------------------------------------------------------------------------
def test_a_checkpoint_name_says_whose_it_is_and_at_which_step() -> None:
    head, child = "upstream_dense-1a2b3c4d-aaaaaa", "dense-downstream-5e6f7a8b-bbbbbb"
    assert checkpoint_dir_name(owner_prefix(head, head), 12) == "checkpoint_00000012"  # the fit's own stage: plain
    chained = checkpoint_dir_name(owner_prefix(child, head), 7)
    assert chained == f"{child}.checkpoint_00000007"
    assert parse_checkpoint_dir("checkpoint_00000012", head) == CheckpointName(head, 12)
    assert parse_checkpoint_dir(chained, head) == CheckpointName(child, 7)
    for other in ("checkpoint_manager_snapshot.json", "checkpoint_", "checkpoint_12a", ".checkpoint_00000001", "x"):
        assert parse_checkpoint_dir(other, head) is None, other


def test_a_restarted_fit_goes_on_from_the_stage_that_wrote_its_latest_checkpoint() -> None:
    stages = [("up-1", 10), ("down-2", 4), ("last-3", 6)]
    assert restart_point(stages, None) == (0, False)  # the first attempt
    assert restart_point(stages, "/ckpt/up-1/checkpoint_00000008") == (0, True)  # mid-way through the first
    assert restart_point(stages, "/ckpt/up-1/checkpoint_00000010") == (1, False)  # the first had finished
    assert restart_point(stages, "/ckpt/up-1/down-2.checkpoint_00000002") == (1, True)
    assert restart_point(stages, "bucket/ckpt/up-1/down-2.checkpoint_00000004") == (2, False)  # S3 paths alike
    with pytest.raises(RuntimeError, match="belongs to none of its stages"):
        restart_point(stages, "/ckpt/up-1/other-9.checkpoint_00000004")


def test_an_interrupted_chained_stage_is_found_in_its_chains_run_folder(tmp_path: Path) -> None:
    prefix = run_prefix("dense/downstream", "5e6f7a8b" * 8)
    head = "upstream_dense-1a2b3c4d-aaaaaa"
    write_checkpoint(tmp_path / head / "checkpoint_00000010", 10)  # the head's own (another stage)
    write_checkpoint(tmp_path / head / f"{prefix}bbbbbb.checkpoint_00000002", 2)
    write_checkpoint(tmp_path / head / f"{prefix}bbbbbb.checkpoint_00000004", 4)
    write_checkpoint(tmp_path / "upstream_dense-1a2b3c4d-cccccc" / f"{prefix}dddddd.checkpoint_00000006", 6)
    found = find_resume_point(str(tmp_path), prefix, finished_runs={f"{prefix}dddddd"}, access=None, log=print)
    assert found is not None and (found.run_name, found.step) == (f"{prefix}bbbbbb", 4)
    assert found.checkpoint_uri == str(tmp_path / head / f"{prefix}bbbbbb.checkpoint_00000004")


def test_a_chain_keeps_each_stages_newest_checkpoints(tmp_path: Path) -> None:
    head, child = "up-1", "down-2"
    for step in (2, 4, 6):
        write_checkpoint(tmp_path / head / f"checkpoint_{step:08d}", step)
        write_checkpoint(tmp_path / head / f"{child}.checkpoint_{step:08d}", step)
    write_checkpoint(tmp_path / head / "stranger-9.checkpoint_00000001", 1)
    deleted = prune_checkpoints(str(tmp_path), head, {head: 1, child: 2}, S3Access())
    assert sorted(Path(p).name for p in deleted) == [
        "checkpoint_00000002",
        "checkpoint_00000004",
        f"{child}.checkpoint_00000002",
    ]
    left = sorted(p.name for p in (tmp_path / head).iterdir())
    kept = [f"{child}.checkpoint_00000004", f"{child}.checkpoint_00000006", "stranger-9.checkpoint_00000001"]
    assert left == ["checkpoint_00000006", *kept]


# ---- one fit, several stages ---------------------------------------------------------------------
def _failing_child(marker: Path, max_failures: int, fits: list[list[str]]):
    """A chain runner whose `dense/downstream` stage loses its worker at step 1, once; each fit's run names go
    to `fits`."""

    def run(links: list[ChainLink], **kwargs: Any) -> ChainResult:
        fits.append([link.run_name for link in links])
        faulty = []
        for link in links:
            if link.run_name.startswith("dense-downstream-"):
                fault = FaultInjection(step=1, marker=str(marker))
                link = replace(link, config=replace(link.config, fault_injection=fault, max_failures=max_failures))
            faulty.append(link)
        return run_chain(faulty, **kwargs)

    return run


def _stage_rows(store: ResultsStore) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in store.rows(row_type="stage"):
        rows.setdefault(row["stage"], []).append(row)
    return rows


@pytest.mark.slow
def test_a_worker_lost_in_a_chained_stage_restarts_that_stage_not_its_parent(ray_local, tmp_path: Path) -> None:
    exp, marker = smoke(tmp_path, "pipelines=[dense]"), tmp_path / "fault"
    store, fits = ResultsStore(exp.results), []
    assert ExperimentRunner(exp, store, log=lambda _: None, chain_runner=_failing_child(marker, 1, fits)).run().ok
    assert marker.exists(), "the child's worker was lost"
    assert len(fits) == 1 and len(fits[0]) == 2, "the dense pipeline's two stages train in one fit"
    rows = _stage_rows(ResultsStore(exp.results))
    (up,), (down,) = rows["upstream_dense"], rows["dense/downstream"]
    assert up["status"] == down["status"] == "succeeded"
    parent, child = Path(up["checkpoint_uri"]), Path(down["checkpoint_uri"])
    assert parent.parent == child.parent and parent.parent.name == up["run_id"], "one fit, one run folder"
    assert child.name == f"{down['run_id']}.checkpoint_00000002" and down["parent_run_id"] == up["run_id"]
    assert (parent / MODEL_FILE).stat().st_mtime < marker.stat().st_mtime, "the finished parent did not train again"
    ledgers = {row["stage"]: json.loads(row["ledger"]) for row in (up, down)}
    assert ledgers["dense/downstream"]["start_seconds"] == 0, "Ray Train started once, charged to the first stage"
    assert ledgers["upstream_dense"]["start_seconds"] > 0
    for row in (up, down):
        assert sum(ledgers[row["stage"]].values()) == pytest.approx(row["wall_seconds"], rel=1e-3)
    assert up["finished_at"] <= down["started_at"], "each stage's row spans its own part of the fit"


@pytest.mark.slow
def test_a_failed_chained_stage_leaves_the_others_trained_and_the_rerun_trains_only_it(
    ray_local, tmp_path: Path
) -> None:
    """The dense core, dense/downstream and rmoe_d/downstream train in one fit; dense/downstream fails: the
    core is recorded, rmoe_d/downstream (not below the failure) trains in a fit of its own."""
    exp, marker = smoke(tmp_path, "pipelines=[dense, rmoe_d]"), tmp_path / "fault"
    store, fits = ResultsStore(exp.results), []
    report = ExperimentRunner(exp, store, log=lambda _: None, chain_runner=_failing_child(marker, 0, fits)).run()
    assert not report.ok and marker.exists()
    assert [[name.split("-")[0] for name in fit] for fit in fits] == [["upstream_dense", "dense", "rmoe_d"], ["rmoe_d"]]
    rows = _stage_rows(store)
    (up,), (down,), (rmoe_d,) = rows["upstream_dense"], rows["dense/downstream"], rows["rmoe_d/downstream"]
    assert up["status"] == "succeeded" and (Path(up["checkpoint_uri"]) / MODEL_FILE).is_file()
    assert down["status"] == "failed" and down["error"]
    assert rmoe_d["status"] == "succeeded" and rmoe_d["parent_run_id"] == up["run_id"]
    assert Path(rmoe_d["checkpoint_uri"]).parent.name == rmoe_d["run_id"], "a fit of its own after the failure"
    again = ExperimentRunner(exp, store, log=lambda _: None).run()
    assert again.ok and again.outcomes["upstream_dense"].status == again.outcomes["rmoe_d/downstream"].status
    assert again.outcomes["upstream_dense"].status == "cached"
    rows = _stage_rows(store)
    assert len(rows["upstream_dense"]) == 1 and [r["status"] for r in rows["dense/downstream"]] == [
        "failed",
        "succeeded",
    ]
