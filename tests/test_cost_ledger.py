"""A stage's cost ledger on local Ray: the parts add up to its wall time, the compared cost is compute only,
and training time scales with the steps while the overhead does not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rmoe_platform.config.stage import StageConfig
from rmoe_platform.cost.devices import device_table
from rmoe_platform.cost.ledger import COMPUTE_PARTS, DRIVER_PARTS, WORKER_PARTS
from rmoe_platform.pipelines.accounting import stage_cost
from rmoe_platform.stage.prepare import prepare_stage
from rmoe_platform.stage.run import StageResult, run_stage

pytestmark = pytest.mark.slow


def config(tmp_path: Path, steps: int) -> StageConfig:
    """One epoch holds either budget (no epoch boundary: the same number of evaluations and checkpoints)."""
    return StageConfig.from_dict(
        {
            "name": f"ledger-{steps}",
            "storage": str(tmp_path / "runs"),
            # two blocks, not the arch's six: the 40 steps still train for ~4 s (ratio 80/40 at 2.07); the test
            # took 93 s alone, and 147 s instead of 220 s in the suite
            "model": {"arch": "rmoe_vit_nano_patch4_32", "kwargs": {"depth": 2}},
            "budget": {"steps": steps},
            "batch_size": 32,
            "log_every": 10,
            "checkpoint": {"every_n_epochs": None, "keep": 1},
            "data": {
                "uri": str(tmp_path / "data" / "shapes"),
                "generate": {"num_train": 4096, "num_val": 64, "num_classes": 10, "shard_rows": 512},
            },
        }
    )


def timed_run(cfg: StageConfig) -> tuple[StageResult, float]:
    """The stage run, and its wall time measured here (less the driver's validation, timed apart)."""
    started = time.perf_counter()
    prepare_stage(cfg)
    prepared = time.perf_counter() - started
    started = time.perf_counter()
    result = run_stage(cfg)
    return result, time.perf_counter() - started - prepared


def test_ledger_adds_up_and_the_compared_cost_is_compute_only(ray_local, tmp_path: Path) -> None:
    prepare_stage(config(tmp_path, 40))  # generate the data once, outside the timed runs
    runs = [timed_run(config(tmp_path, steps)) for steps in (40, 80, 40)]
    for result, wall in runs:
        ledger = result.cost.ledger
        parts = ledger.parts()
        assert set(parts) == set(WORKER_PARTS) | set(DRIVER_PARTS)
        assert all(value >= 0 for value in parts.values()), parts
        assert abs(ledger.wall_seconds - wall) <= 0.05 * wall, (parts, wall)
        assert ledger.train > 0 and ledger.eval > 0 and ledger.start > 0 and ledger.checkpoint > 0
        compute = sum(parts[p] for p in COMPUTE_PARTS)
        assert result.cost.device_seconds == pytest.approx(compute * result.cost.num_workers)
        assert result.cost.overhead_device_seconds == pytest.approx(ledger.wall_seconds - compute)
        cost = stage_cost(result.cost.train_flops, result.cost.device_seconds, "cpu", {"cpu": 0.05})
        assert cost.dollars == pytest.approx(compute / 3600 * 0.05), "overhead is never priced into the cost"
        achieved = result.cost.achieved_flops_per_second
        assert achieved == pytest.approx(result.cost.train_flops / ledger.train)
        assert result.cost.mfu() == pytest.approx(achieved / 1e11)  # the table's nominal CPU worker
        faster = device_table({"cpu": {"peak_fp32": 2e11}})
        assert result.cost.mfu(faster) == pytest.approx(achieved / 2e11), "the experiment's table counts"
        assert result.cost.device_model == "cpu"
    # The 40-step stage runs before and after the 80-step one and the faster of the two counts: whatever else
    # the machine runs only ever adds wall time (CI once measured a first run's 40 steps 2.4 s slower than
    # usual, a ratio of 1.49), while a fixed cost charged to training would slow both alike.
    ledgers = [result.cost.ledger for result, _ in runs]
    short = min(ledgers[0], ledgers[2], key=lambda ledger: ledger.train)
    ratio = ledgers[1].train / short.train
    assert 1.5 <= ratio <= 3.0, [ledger.parts() for ledger in ledgers]
    # Overhead that scaled with the steps would double here. One-sided as well: the first run in a session
    # also pays cold starts (worker imports, the first dataset read), which say nothing about the steps.
    overheads = min(ledgers[0].overhead_seconds, ledgers[2].overhead_seconds), ledgers[1].overhead_seconds
    assert overheads[1] - overheads[0] <= 0.5 * overheads[0] + 2.0, overheads
