"""A stage's data on the driver: the streaming Ray Datasets its Train workers read (train: shard order
seeded per epoch; val: in order) and the ledger actor that counts their undecodable rows."""

from __future__ import annotations

from collections.abc import Sequence
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


def ingest_config(train_datasets: Sequence[str], num_workers: int) -> DataConfig:
    """Training datasets (`train_datasets`) go through Ray Data's streaming split, one worker or several;
    validation datasets too on several workers (each evaluates its shard). Stream order is preserved, so the
    seeded shuffle gives the same order on every run.

    Why split training even for one worker (measured, do not undo without measuring training): unsplit, the
    split's coordinator actor goes, and with it ~2 s of each epoch's first batch, but the streaming executor
    then runs inside the training process and slows the steps: the demo's 288-step upstream stages trained in
    34.1 s (dense) and 71.0 s (MoE) unsplit against 25.7 s and 36.4 s split
    (`benchmarks/stage_overhead.py --config configs/demo.yaml --pipelines dense,moe`, one run each, same
    machine), which would also skew the compared compute against the MoE. A validation runs no training, so
    a single worker reads it unsplit, without the coordinator's start.
    """
    limits = DataContext.get_current().execution_options.resource_limits
    split = "all" if num_workers > 1 else list(train_datasets)
    return DataConfig(
        datasets_to_split=split, execution_options=ExecutionOptions(preserve_order=True, resource_limits=limits)
    )
