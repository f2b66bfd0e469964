"""Datasets in the shard format: procedural generation, converters, and Ray Data ingest."""

from rmoe_platform.datasets.format import CARD_FILE, FORMAT_VERSION, SCHEMAS, TASKS, DatasetCard, FormatError
from rmoe_platform.datasets.scenes import SceneRecipe
from rmoe_platform.datasets.transforms import AugmentSpec
from rmoe_platform.datasets.writer import DatasetPlan, read_card, write_dataset

__all__ = [
    "CARD_FILE",
    "FORMAT_VERSION",
    "SCHEMAS",
    "TASKS",
    "AugmentSpec",
    "DatasetCard",
    "DatasetPlan",
    "FormatError",
    "SceneRecipe",
    "read_card",
    "write_dataset",
]
