"""The shard format: Parquet shards per split plus a dataset card (`card.json`), written last.

Layout under a dataset root (local folder or s3://bucket/prefix):

    card.json                                   task, classes, splits (shards, row counts), stats
    train/part-00000-of-00004.parquet           one row per example, columns by task (SCHEMAS)
    val/part-00000-of-00001.parquet

A dataset without `card.json` is incomplete (still being written, or interrupted): readers refuse it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa

from rmoe_platform.names import TASKS

FORMAT_VERSION = 1
CARD_FILE = "card.json"
Task = Literal["classification", "segmentation", "detection"]
IGNORE_INDEX = 255  # segmentation masks: pixels to ignore

SCHEMAS: dict[str, pa.Schema] = {
    "classification": pa.schema([("image", pa.binary()), ("label", pa.int64()), ("id", pa.int64())]),
    "segmentation": pa.schema([("image", pa.binary()), ("mask", pa.binary()), ("id", pa.int64())]),
    "detection": pa.schema(
        [
            ("image", pa.binary()),
            ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, pixels, x1/y1 exclusive
            ("labels", pa.list_(pa.int64())),  # 0-based indices into the card's classes
            ("masks", pa.list_(pa.string())),  # JSON per instance: COCO RLE dict or polygon list
            ("id", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    ),
}


class FormatError(ValueError):
    """A dataset that does not follow the shard format (the message names the file)."""


def dataset_name(uri: str) -> str:
    """A dataset's default name: the last component of its root."""
    return PurePosixPath(uri.rstrip("/").split("://", 1)[-1]).name or "dataset"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/part-{index:05d}-of-{count:05d}.parquet"


def check_schema(schema: pa.Schema, task: str, where: str) -> None:
    """`schema` has exactly the task's columns with the right types; FormatError naming `where` if not."""
    expected = SCHEMAS[task]
    got = {f.name: f.type for f in schema}
    missing = [f.name for f in expected if f.name not in got]
    extra = [name for name in got if expected.get_field_index(name) < 0]
    wrong = [
        f"{f.name}: {got[f.name]} (expected {f.type})"
        for f in expected
        if f.name in got and not _compatible(got[f.name], f.type)
    ]
    problems = []
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected column(s) {', '.join(extra)}")
    if wrong:
        problems.append(f"wrong type(s) {'; '.join(wrong)}")
    if problems:
        raise FormatError(f"{where}: schema does not match a {task} shard: {'; '.join(problems)}")


def _compatible(got: pa.DataType, expected: pa.DataType) -> bool:
    if got.equals(expected):
        return True
    if pa.types.is_large_binary(got) and pa.types.is_binary(expected):
        return True
    if pa.types.is_large_string(got) and pa.types.is_string(expected):
        return True
    if pa.types.is_list(expected) and (pa.types.is_list(got) or pa.types.is_large_list(got)):
        return _compatible(got.value_type, expected.value_type)
    if pa.types.is_fixed_size_list(expected) and pa.types.is_fixed_size_list(got):
        return got.list_size == expected.list_size and _compatible(got.value_type, expected.value_type)
    return False


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    num_rows: int


@dataclass(frozen=True)
class SplitInfo:
    num_rows: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class ImageStats:
    """Per-channel mean/std (0..1 scale) and image sizes, over the train split."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_hw: tuple[int, int]
    max_hw: tuple[int, int]
    mean_hw: tuple[float, float]


@dataclass(frozen=True)
class DataFacts:
    """What a stage's task knows of its dataset from the start: the train split's per-channel pixel
    statistics (0..1 scale; the model normalises with them) and the class names (evaluation)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def image_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std


@dataclass(frozen=True)
class DatasetCard:
    name: str
    task: Task
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    stats: ImageStats
    source: dict[str, Any] = field(default_factory=dict)  # how it was made: a recipe or a conversion
    format_version: int = FORMAT_VERSION
    created: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def facts(self) -> DataFacts:
        return DataFacts(tuple(self.stats.mean), tuple(self.stats.std), tuple(self.classes))

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise FormatError(f"dataset {self.name!r} has no {name!r} split (has: {', '.join(self.splits)})")
        return self.splits[name]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> DatasetCard:
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise FormatError(f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
            if data["task"] not in TASKS:
                raise FormatError(f"{where}: unknown task {data['task']!r} (known: {', '.join(TASKS)})")
            splits = {
                name: SplitInfo(
                    int(split["num_rows"]), tuple(ShardInfo(s["path"], int(s["num_rows"])) for s in split["shards"])
                )
                for name, split in data["splits"].items()
            }
            stats = data["stats"]
            return cls(
                name=data["name"],
                task=data["task"],
                classes=tuple(data["classes"]),
                splits=splits,
                stats=ImageStats(
                    mean=tuple(stats["mean"]),
                    std=tuple(stats["std"]),
                    min_hw=tuple(stats["min_hw"]),
                    max_hw=tuple(stats["max_hw"]),
                    mean_hw=tuple(stats["mean_hw"]),
                ),
                source=data.get("source", {}),
                format_version=version,
                created=data.get("created", ""),
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(f"{where}: not a valid dataset card ({type(err).__name__}: {err})") from None
