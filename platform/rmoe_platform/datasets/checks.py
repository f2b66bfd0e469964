"""A dataset on the driver, before a stage or an experiment starts: check it without writing anything (present
and valid, or generatable from its recipe where it should be), and generate it once everything else is valid."""

from __future__ import annotations

from dataclasses import dataclass

from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import DataSpec
from rmoe_platform.datasets.format import DataFacts, DatasetCard, FormatError, dataset_name
from rmoe_platform.datasets.ingest import OpenDataset, load_card, open_dataset, validate_card
from rmoe_platform.datasets.writer import write_dataset
from rmoe_platform.storage.s3 import S3Access


@dataclass(frozen=True)
class DatasetCheck:
    """A dataset checked without writing anything: what a stage needs to know of it (task, facts, train
    rows), and the opened dataset, or None while it is still to be generated from `spec.generate` (its
    facts then carry placeholder pixel statistics: enough to build and validate a model, not to train)."""

    task: str
    facts: DataFacts
    num_train: int
    opened: OpenDataset | None

    @property
    def num_classes(self) -> int:
        return len(self.facts.classes)


def check_dataset(spec: DataSpec, access: S3Access | None, field: str = "data") -> DatasetCheck:
    """Without writing anything: the dataset is there and valid, or can be generated at its uri."""
    card = load_card(spec.uri, access, f"{field}.uri")
    if card is None and spec.generate is not None:
        storage.check_writable(spec.uri, f"{field}.uri", access)
        recipe = spec.generate
        placeholder = DataFacts((0.5,) * 3, (0.25,) * 3, tuple(recipe.classes))
        return DatasetCheck(recipe.task, placeholder, recipe.num_train, None)
    if card is None:
        opened = open_dataset(spec.uri, access, f"{field}.uri")  # raises: no dataset there
    else:
        _check_recipe(spec, card, field)
        opened = validate_card(spec.uri, card, access, f"{field}.uri")
    return DatasetCheck(card.task, card.facts, card.split("train").num_rows, opened)


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
    wanted = spec.generate.to_dict()
    if recipe != wanted:
        differs = sorted(k for k in wanted if (recipe or {}).get(k) != wanted[k])
        raise ConfigError(
            f"{field}.generate: the dataset at {spec.uri!r} was made from another recipe (differs in: "
            f"{', '.join(differs) or 'source'}); use another data.uri or remove that dataset"
        )
