"""Write a dataset in the shard format, resumably: finished shards are kept, the card comes last.

A shard's rows are a pure function of (source, split, shard index), so an interrupted run picks up
where it stopped: shards already present (with the same source fingerprint and row count) are skipped.
Each shard carries its own pixel statistics in its Parquet metadata, so the card's mean/std and size
stats are exact without re-reading the images of skipped shards.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from rmoe_platform import storage
from rmoe_platform.datasets.format import (
    CARD_FILE,
    SCHEMAS,
    DatasetCard,
    FormatError,
    ImageStats,
    ShardInfo,
    SplitInfo,
    shard_name,
)
from rmoe_platform.storage.s3 import S3Access

STATS_KEY = b"rmoe.shard_stats"
SOURCE_KEY = b"rmoe.source"
PLANNED_KEY = b"rmoe.rows_planned"  # a converter may drop unreadable source files: rows <= planned

# (split, start, stop) → the rows, each a dict of the task's columns plus "_pixels": the decoded image.
# A row maker may yield fewer rows than stop - start (source files it could not read).
RowMaker = Callable[[str, int, int], Iterable[dict[str, Any]]]


@dataclass
class PixelStats:
    images: int = 0
    pixels: int = 0
    sums: tuple[float, float, float] = (0.0, 0.0, 0.0)
    squares: tuple[float, float, float] = (0.0, 0.0, 0.0)
    min_hw: tuple[int, int] = (sys.maxsize, sys.maxsize)
    max_hw: tuple[int, int] = (0, 0)
    sum_hw: tuple[int, int] = (0, 0)

    def add(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        values = image.reshape(-1, 3).astype(np.float64) / 255.0
        self.images += 1
        self.pixels += h * w
        self.sums = tuple(np.add(self.sums, values.sum(0)).tolist())
        self.squares = tuple(np.add(self.squares, (values**2).sum(0)).tolist())
        self.min_hw = (min(self.min_hw[0], h), min(self.min_hw[1], w))
        self.max_hw = (max(self.max_hw[0], h), max(self.max_hw[1], w))
        self.sum_hw = (self.sum_hw[0] + h, self.sum_hw[1] + w)

    def merge(self, other: PixelStats) -> None:
        self.images += other.images
        self.pixels += other.pixels
        self.sums = tuple(np.add(self.sums, other.sums).tolist())
        self.squares = tuple(np.add(self.squares, other.squares).tolist())
        self.min_hw = (min(self.min_hw[0], other.min_hw[0]), min(self.min_hw[1], other.min_hw[1]))
        self.max_hw = (max(self.max_hw[0], other.max_hw[0]), max(self.max_hw[1], other.max_hw[1]))
        self.sum_hw = (self.sum_hw[0] + other.sum_hw[0], self.sum_hw[1] + other.sum_hw[1])

    def image_stats(self) -> ImageStats:
        n = max(self.pixels, 1)
        mean = np.asarray(self.sums) / n
        std = np.sqrt(np.maximum(np.asarray(self.squares) / n - mean**2, 0.0))
        images = max(self.images, 1)
        return ImageStats(
            mean=tuple(round(float(v), 6) for v in mean),
            std=tuple(round(float(v), 6) for v in np.maximum(std, 1e-6)),
            min_hw=self.min_hw if self.images else (0, 0),
            max_hw=self.max_hw,
            mean_hw=(round(self.sum_hw[0] / images, 3), round(self.sum_hw[1] / images, 3)),
        )

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str | bytes) -> PixelStats:
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class DatasetPlan:
    """What to write: name, task, classes, rows per split, and the source (a recipe or a conversion)."""

    name: str
    task: str
    classes: tuple[str, ...]
    split_rows: dict[str, int]
    source: dict[str, Any]
    shard_rows: int = 512

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(
            {
                "task": self.task,
                "classes": self.classes,
                "rows": self.split_rows,
                "source": self.source,
                "shard_rows": self.shard_rows,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_card(uri: str, s3: S3Access | None = None) -> DatasetCard | None:
    """The card at a dataset root, or None when there is none (an absent or unfinished dataset)."""
    fs, root = storage.filesystem(uri, "data.uri", s3)
    path = f"{root}/{CARD_FILE}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return DatasetCard.from_json(storage.read_bytes(fs, path).decode(), where=storage.join(uri, CARD_FILE))


def write_dataset(
    uri: str, plan: DatasetPlan, make_rows: RowMaker, *, s3: S3Access | None = None, progress: bool = True
) -> DatasetCard:
    """Write (or finish writing) the dataset at `uri`; returns its card. Refuses to mix datasets."""
    existing = read_card(uri, s3)
    if existing is not None:
        if existing.source.get("fingerprint") != plan.fingerprint:
            raise FormatError(
                f"{uri}: already holds dataset {existing.name!r} made differently; choose another location"
            )
        return existing
    fs, root = storage.filesystem(uri, "data.uri", s3)
    splits: dict[str, SplitInfo] = {}
    train_stats = PixelStats()
    for split, num_rows in plan.split_rows.items():
        count = max(1, -(-num_rows // plan.shard_rows))
        shards, written = [], 0
        with tqdm(total=num_rows, desc=f"{plan.name} {split}", unit="img", disable=not progress) as bar:
            for index in range(count):
                start, stop = index * plan.shard_rows, min(num_rows, (index + 1) * plan.shard_rows)
                name = shard_name(split, index, count)
                stats = _existing_shard(fs, f"{root}/{name}", plan, stop - start)
                if stats is None:
                    stats = _write_shard(fs, f"{root}/{name}", plan, make_rows(split, start, stop), stop - start)
                if split == "train":
                    train_stats.merge(stats)
                shards.append(ShardInfo(name, stats.images))
                written += stats.images
                bar.update(stop - start)
        splits[split] = SplitInfo(written, tuple(shards))
        if written < num_rows:
            print(f"{plan.name} {split}: skipped {num_rows - written} unreadable source file(s)", file=sys.stderr)
    card = DatasetCard(
        name=plan.name,
        task=plan.task,  # type: ignore[arg-type]
        classes=plan.classes,
        splits=splits,
        stats=train_stats.image_stats(),
        source={**plan.source, "fingerprint": plan.fingerprint, "skipped_rows": _skipped(plan, splits)},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    storage.write_bytes(fs, f"{root}/{CARD_FILE}", card.to_json().encode())
    return card


def _existing_shard(fs: pafs.FileSystem, path: str, plan: DatasetPlan, rows: int) -> PixelStats | None:
    """The stats of a finished shard of this same dataset, or None if it must be (re)written."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    try:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
    except Exception:
        return None  # unreadable (e.g. cut short): rewrite it
    kv = meta.metadata or {}
    if kv.get(SOURCE_KEY, b"").decode() != plan.fingerprint:
        raise FormatError(f"{path}: a shard of another dataset is in the way; choose an empty location")
    if kv.get(PLANNED_KEY) != str(rows).encode() or STATS_KEY not in kv:
        return None
    stats = PixelStats.from_json(kv[STATS_KEY])
    return stats if stats.images == meta.num_rows else None


def _skipped(plan: DatasetPlan, splits: dict[str, SplitInfo]) -> dict[str, int]:
    return {split: plan.split_rows[split] - info.num_rows for split, info in splits.items()}


def _write_shard(
    fs: pafs.FileSystem, path: str, plan: DatasetPlan, rows: Iterable[dict[str, Any]], planned: int
) -> PixelStats:
    schema = SCHEMAS[plan.task]
    stats = PixelStats()
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        stats.add(row["_pixels"])
        for name in schema.names:
            columns[name].append(row[name])
    table = pa.table(columns, schema=schema).replace_schema_metadata(
        {STATS_KEY: stats.to_json().encode(), SOURCE_KEY: plan.fingerprint.encode(), PLANNED_KEY: str(planned).encode()}
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=128)
    storage.write_bytes(fs, path, buffer.getvalue())
    return stats
