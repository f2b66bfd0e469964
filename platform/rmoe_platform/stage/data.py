"""A stage's data on the driver: the streaming Ray Datasets its Train workers read (train: shard order
seeded per epoch; val: in order) and the ledger actor that counts their undecodable rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import ray.data
from ray.data import DataContext, ExecutionOptions
from ray.train import DataConfig

from rmoe_platform.config.stage import DataSpec
from rmoe_platform.datasets.ingest import CorruptDataError, DecodeSpec, OpenDataset, create_ledger, read_split


@dataclass
class StageData:
    """The Ray Datasets of a stage and the ledger that counts their undecodable rows."""

    datasets: dict[str, ray.data.Dataset]
    ledger: Any

    def skipped_rows(self) -> dict[str, int]:
        return ray.get(self.ledger.counts.remote())

    def failure(self) -> CorruptDataError | None:
        """Why the data failed the run, if it did (too many undecodable rows)."""
        message = ray.get(self.ledger.failure.remote())
        return None if message is None else CorruptDataError(message)

    def close(self) -> None:
        ray.kill(self.ledger)


def stage_data(opened: OpenDataset, task: str, spec: DataSpec, img_size: int, seed: int) -> StageData:
    """Train (shard order and augmentation seeded by `seed` and the epoch) and validation (in order) splits."""
    ledger = create_ledger(opened, spec.max_bad_fraction)

    def decode(mode: str) -> DecodeSpec:
        return DecodeSpec(task, mode, img_size, spec.augment, spec.max_bad_fraction, seed)

    return StageData(
        {
            "train": read_split(opened, "train", decode("train"), ledger, seed=seed),
            "val": read_split(opened, "val", decode("eval"), ledger),
        },
        ledger,
    )


def ingest_config(num_workers: int) -> DataConfig:
    """Stream order preserved, so the seeded shuffle gives the same order on every run.

    A single worker reads its datasets whole, unsplit, the executor in its own process: a streaming split
    puts a coordinator actor (a fresh process) between each dataset and its lone reader. Measured on the smoke
    preset (`benchmarks/stage_overhead.py`, warm stages): the wait for an epoch's first batch 2.1-2.5 s split,
    0.2-0.3 s unsplit; a 32-image validation 2.3-3.0 s split, 0.1-0.2 s unsplit. Same rows in the same order,
    and epochs still count executions (`ingest.execution_epoch`) either way.
    """
    limits = DataContext.get_current().execution_options.resource_limits
    options = ExecutionOptions(preserve_order=True, resource_limits=limits)
    return DataConfig(datasets_to_split="all" if num_workers > 1 else [], execution_options=options)
