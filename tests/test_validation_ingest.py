"""How a stage's validation reads its data: unsplit on one worker (no split coordinator to start), split on
several (each worker evaluates its shard), and the wait for its first batch charged to `ingest_start`,
not to the evaluation's compute."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rmoe_platform.cost.ledger import LapClock
from rmoe_platform.stage.data import ingest_config
from rmoe_platform.stage.worker.loop import IngestWait, _lap_first_batch


def slow_start(batches: int, wait: float) -> Iterator[int]:
    time.sleep(wait)  # Ray Data starting the pipeline
    yield from range(batches)


def test_the_wait_for_the_first_validation_batch_is_ingest_start() -> None:
    clock = LapClock()
    seen = []
    for batch in _lap_first_batch(slow_start(3, 0.5), IngestWait(clock)):
        seen.append(batch)
        time.sleep(0.05)  # the evaluation's compute
    clock.lap("eval")
    assert seen == [0, 1, 2]
    assert clock.seconds["ingest_start"] >= 0.5
    assert 0.15 <= clock.seconds["eval"] < 0.45, "the evaluation is charged its compute, not the wait"
    assert clock.seconds["train"] == 0.0


def test_an_empty_validation_still_laps_its_wait() -> None:
    clock = LapClock()
    assert list(_lap_first_batch(slow_start(0, 0.1), IngestWait(clock))) == []
    assert clock.seconds["ingest_start"] >= 0.1


@pytest.mark.parametrize(("workers", "split"), [(1, ["train_0", "train_1"]), (2, "all")])
def test_one_worker_reads_validation_unsplit_several_split_it(workers: int, split: object) -> None:
    config = ingest_config(["train_0", "train_1"], workers)
    assert config._datasets_to_split == split
    for dataset in ("train_0", "val_0"):
        assert config._resolve_execution_options(dataset).preserve_order, "the seeded shuffle's order is kept"


def test_a_stages_coordinators_still_starting_are_waited_for_at_the_first_batch(ray_local) -> None:
    """The split coordinators a stage's shards started as it began: its first batch waits until they are up,
    charged to ingest_start, so no training is timed while their processes start; later batches don't."""
    import ray

    @ray.remote(num_cpus=0)
    class SlowToStart:
        def __init__(self) -> None:
            time.sleep(1.0)

    clock = LapClock()
    ingest = IngestWait(clock, [SlowToStart.remote(), SlowToStart.remote()])
    ingest.first_batch_arrived()
    assert clock.seconds["ingest_start"] >= 1.0 and ingest.starting == []
    waited = clock.seconds["ingest_start"]
    ingest.first_batch_arrived()  # a later epoch: nothing left to wait for
    assert clock.seconds["ingest_start"] - waited < 0.5
