"""A stage's data on the driver: make sure the dataset exists (generating it from its recipe if asked),
validate it, and build the streaming Ray Datasets the Train workers read; plus the worker-side helper
that moves a batch to the device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import torch

from rmoe_platform import storage
from rmoe_platform.config import DataSpec
from rmoe_platform.configtools import ConfigError
from rmoe_platform.datasets.format import DatasetCard, FormatError, dataset_name
from rmoe_platform.datasets.ingest import (
    CorruptDataError,
    DecodeSpec,
    OpenDataset,
    create_ledger,
    load_card,
    open_dataset,
    read_split,
    validate_card,
)
from rmoe_platform.datasets.writer import write_dataset
from rmoe_platform.s3 import S3Access


@dataclass(frozen=True)
class DatasetCheck:
    """A dataset checked without writing anything: what a stage needs to know of it (task, class count,
    train rows), and the opened dataset, or None while it is still to be generated from `spec.generate`."""

    task: str
    num_classes: int
    num_train: int
    opened: OpenDataset | None


def check_dataset(spec: DataSpec, access: S3Access | None, field: str = "data") -> DatasetCheck:
    """Without writing anything: the dataset is there and valid, or can be generated at its uri."""
    card = load_card(spec.uri, access, f"{field}.uri")
    if card is None and spec.generate is not None:
        storage.check_writable(spec.uri, f"{field}.uri", access)
        recipe = spec.generate
        return DatasetCheck(recipe.task, len(recipe.classes), recipe.num_train, None)
    if card is None:
        opened = open_dataset(spec.uri, access, f"{field}.uri")  # raises: no dataset there
    else:
        _check_recipe(spec, card, field)
        opened = validate_card(spec.uri, card, access, f"{field}.uri")
    return DatasetCheck(card.task, card.num_classes, card.split("train").num_rows, opened)


def ensure_dataset(
    spec: DataSpec,
    access: S3Access | None,
    field: str = "data",
    checked: DatasetCheck | None = None,
    progress: bool = True,
) -> OpenDataset:
    """The opened dataset, generated first when it is absent and `spec.generate` is set. `checked`, a
    `check_dataset` result for the same spec, saves reading and validating it again."""
    checked = checked or check_dataset(spec, access, field)
    if checked.opened is not None:
        return checked.opened
    recipe = spec.generate
    assert recipe is not None  # check_dataset returns no opened dataset only for a recipe
    try:
        write_dataset(spec.uri, recipe.plan(dataset_name(spec.uri)), recipe.rows, s3=access, progress=progress)
    except FormatError as err:
        raise ConfigError(f"{field}.uri: {err}") from None
    return open_dataset(spec.uri, access, f"{field}.uri")


def _check_recipe(spec: DataSpec, card: DatasetCard, field: str) -> None:
    if spec.generate is None:
        return
    recipe = card.source.get("recipe")
    wanted = dataclasses.asdict(spec.generate)
    if recipe != wanted:
        differs = sorted(k for k in wanted if (recipe or {}).get(k) != wanted[k])
        raise ConfigError(
            f"{field}.generate: the dataset at {spec.uri!r} was made from another recipe (differs in: "
            f"{', '.join(differs) or 'source'}); use another data.uri or remove that dataset"
        )


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
    """Train (shard order seeded) and validation (in order) splits of the stage's dataset."""
    ledger = create_ledger(opened, spec.max_bad_fraction)

    def decode(mode: str) -> DecodeSpec:
        return DecodeSpec(task, mode, img_size, spec.augment, spec.max_bad_fraction)

    return StageData(
        {
            "train": read_split(opened, "train", decode("train"), ledger, seed=seed),
            "val": read_split(opened, "val", decode("eval"), ledger),
        },
        ledger,
    )


class Normalizer:
    """uint8 NCHW batches → float32 normalised with the dataset's mean/std, on the training device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.scale.device, torch.float32, non_blocking=True) * self.scale - self.shift
