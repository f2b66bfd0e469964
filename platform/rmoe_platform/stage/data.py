"""A fit's data on the driver: the streaming Ray Datasets its Train workers read (each stage's train split:
shard order seeded per epoch; its val split: in order) and the one ledger actor that counts their undecodable
rows, keyed by the fit's dataset names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
from ray.data import DataContext, ExecutionOptions
from ray.train import DataConfig

from rmoe_platform.config.stage import DataSpec
from rmoe_platform.datasets.ingest import (
    CorruptDataError,
    DecodeLedger,
    DecodeSpec,
    OpenDataset,
    bad_row_budgets,
    read_split,
)


@dataclass(frozen=True)
class StageInput:
    """What one stage of a fit reads (`spec` with its `img_size` resolved, as `prepare_stage` leaves it), and
    the names the fit gives its two splits (`WorkerPayload`'s)."""

    opened: OpenDataset
    task: str
    spec: DataSpec
    seed: int
    train_name: str
    val_name: str

    @property
    def names(self) -> dict[str, str]:
        """The fit's dataset name of each split."""
        return {"train": self.train_name, "val": self.val_name}

    def decode_spec(self, mode: str) -> DecodeSpec:
        """How the stage's rows decode in `mode` ("train": augmented, seeded by the stage's seed; "eval")."""
        spec = self.spec
        if spec.img_size is None:
            raise ValueError(f"{spec.uri}: data.img_size is unresolved (prepare_stage resolves it)")
        return DecodeSpec(self.task, mode, spec.img_size, spec.augment, spec.max_bad_fraction, self.seed)


@dataclass
class FitData:
    """The Ray Datasets of a fit's stages, by the fit's dataset names, and the ledger of their bad rows.

    One ledger for the fit, not one per stage: each is an actor process to start (about 1 s of CPU), and a
    fit's datasets are all set up as it starts, so a chain's ledgers competed with its first stage's start."""

    datasets: dict[str, ray.data.Dataset]
    ledger: Any
    stages: tuple[StageInput, ...]

    def skipped_rows(self) -> list[dict[str, int]]:
        """Each stage's undecodable rows per split, in stage order."""
        counts = ray.get(self.ledger.counts.remote())
        return [{split: counts[name] for split, name in stage.names.items()} for stage in self.stages]

    def failure(self) -> CorruptDataError | None:
        """Why the data failed the fit, if it did (too many undecodable rows in a stage's split)."""
        message = ray.get(self.ledger.failure.remote())
        return None if message is None else CorruptDataError(message)

    def close(self) -> None:
        ray.kill(self.ledger)


def fit_data(stages: Sequence[StageInput]) -> FitData:
    """Each stage's train split (shard order and augmentation seeded by its seed and the epoch) and val split
    (in order), counted in one ledger."""
    budgets: dict[str, int] = {}
    for stage in stages:
        for split, budget in bad_row_budgets(stage.opened, stage.spec.max_bad_fraction, tuple(stage.names)).items():
            budgets[stage.names[split]] = budget
    ledger = DecodeLedger.remote(budgets)
    try:
        datasets: dict[str, ray.data.Dataset] = {}
        for stage in stages:
            datasets[stage.train_name] = read_split(
                stage.opened, "train", stage.decode_spec("train"), ledger, seed=stage.seed, ledger_key=stage.train_name
            )
            datasets[stage.val_name] = read_split(
                stage.opened, "val", stage.decode_spec("eval"), ledger, ledger_key=stage.val_name
            )
    except BaseException:
        ray.kill(ledger)
        raise
    return FitData(datasets, ledger, tuple(stages))


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
