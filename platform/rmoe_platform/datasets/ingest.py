"""Ray Data ingest of shard-format datasets from a local folder or s3://: validated up front, decoded
and augmented in `map_batches` on CPU workers, streamed to Train workers as fixed-size tensors.

Augmentation is reproducible: each row's random draws come from a generator seeded by (stage seed, epoch,
row id), so a row is augmented the same way whichever worker, task or batch decodes it (`row_rng`).

Undecodable rows are dropped and counted in a small ledger actor (deduplicated over epochs); once
they pass `max_bad_fraction` of the split, the batch that found the last one raises an error naming
the shard and the row, which fails the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.collate_fn import NumpyBatchCollateFn

from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.datasets import transforms as T
from rmoe_platform.datasets.codec import DecodeError, decode_image, decode_mask, instance_mask_decode
from rmoe_platform.datasets.format import CARD_FILE, IGNORE_INDEX, DatasetCard, FormatError, check_schema
from rmoe_platform.datasets.writer import read_card
from rmoe_platform.storage.s3 import S3Access, explain_error

Mode = Literal["train", "eval", "decode"]  # decode: raw pixels and targets, no resize/augment/normalize


class CorruptDataError(RuntimeError):
    """Too many undecodable rows in a split."""


@dataclass(frozen=True)
class OpenDataset:
    """A validated dataset: its card, where it lives, and how to reach it."""

    uri: str
    card: DatasetCard
    access: S3Access | None

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return storage.filesystem(self.uri, "data.uri", self.access)

    def shard_paths(self, split: str) -> list[str]:
        _, root = self.filesystem()
        return [f"{root}/{shard.path}" for shard in self.card.split(split).shards]


def load_card(uri: str, access: S3Access | None = None, field: str = "data.uri") -> DatasetCard | None:
    """The card at `uri`, or None when there is no dataset (yet); a ConfigError naming `field` for a
    missing bucket, refused credentials, an unreachable endpoint or a malformed card."""
    uri = storage.normalize(uri)
    if storage.is_remote(uri):
        access = access or S3Access.resolve()
        storage.check_bucket(uri, field, access)
    try:
        return read_card(uri, access)
    except FormatError as err:
        raise ConfigError(f"{field}: {err}") from None
    except OSError as err:
        raise ConfigError(f"{field}: {explain_error(err, uri, access or S3Access())}") from None


def open_dataset(uri: str, access: S3Access | None = None, field: str = "data.uri") -> OpenDataset:
    """Check the location, the card and every shard's schema; a ConfigError naming `field` otherwise."""
    uri = storage.normalize(uri)
    if storage.is_remote(uri):
        access = access or S3Access.resolve()
    card = load_card(uri, access, field)
    if card is None:
        raise ConfigError(
            f"{field}: no dataset at {uri!r} (no {CARD_FILE}; write one with jobs/prepare_data.py, "
            "or give data.generate to generate it)"
        )
    return validate_card(uri, card, access, field)


def validate_card(uri: str, card: DatasetCard, access: S3Access | None, field: str = "data.uri") -> OpenDataset:
    """A dataset whose card was read: no empty split, every shard present with the task's schema."""
    opened = OpenDataset(storage.normalize(uri), card, access)
    for split in ("train", "val"):
        info = card.split(split) if split in card.splits else None
        if info is None or info.num_rows == 0 or not info.shards:
            raise ConfigError(f"{field}: dataset {card.name!r} at {uri!r} has an empty or missing {split!r} split")
    _check_shards(opened, field)
    return opened


def _check_shards(opened: OpenDataset, field: str) -> None:
    fs, root = opened.filesystem()
    for split, info in opened.card.splits.items():
        for shard in info.shards:
            where = storage.join(opened.uri, shard.path)
            try:
                with fs.open_input_file(f"{root}/{shard.path}") as handle:
                    meta = pq.ParquetFile(handle).metadata
                    schema = meta.schema.to_arrow_schema()
            except FileNotFoundError:
                raise ConfigError(f"{field}: shard {where!r} listed in the card is missing") from None
            except OSError as err:
                raise ConfigError(f"{field}: shard {where!r} is unreadable: {err}") from None
            try:
                check_schema(schema, opened.card.task, where)
            except FormatError as err:
                raise ConfigError(f"{field}: {err}") from None
            if meta.num_rows != shard.num_rows:
                raise ConfigError(
                    f"{field}: shard {where!r} has {meta.num_rows} rows, the card says {shard.num_rows} ({split})"
                )


@ray.remote(num_cpus=0)
class DecodeLedger:
    """Counts undecodable rows per key, each row once however many epochs re-read it. A key is a split (one
    dataset's ledger) or a fit's dataset name (one ledger for every stage of a fit: one actor to start, not
    one per stage)."""

    def __init__(self, allowed: dict[str, int]) -> None:
        self.allowed = allowed
        self.bad: dict[str, set[tuple[str, int]]] = {key: set() for key in allowed}
        self.error: str | None = None

    def record(self, key: str, rows: list[tuple[str, int]]) -> tuple[int, int]:
        self.bad[key].update(rows)
        return len(self.bad[key]), self.allowed[key]

    def fail(self, message: str) -> None:
        """The first over-budget error, for the driver (Ray truncates errors raised deep in a worker)."""
        self.error = self.error or message

    def counts(self) -> dict[str, int]:
        return {key: len(rows) for key, rows in self.bad.items()}

    def failure(self) -> str | None:
        return self.error


@dataclass(frozen=True)
class DecodeSpec:
    """What one split's decode step does."""

    task: str
    mode: Mode
    size: int
    augment: T.AugmentSpec
    max_bad_fraction: float
    seed: int = 0  # the stage's seed: with the epoch and the row id, it fixes every augmentation draw


class DecodeBatch:
    """The `map_batches` function: decode (and transform) each row; drop and count bad rows in the ledger
    under `ledger_key` (default: the split)."""

    def __init__(
        self, spec: DecodeSpec, split: str, opened: OpenDataset, ledger: Any, ledger_key: str | None = None
    ) -> None:
        self.spec, self.split, self.opened, self.ledger = spec, split, opened, ledger
        self.ledger_key = ledger_key or split
        self.decode_row: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] = getattr(
            self, f"_{spec.task}"
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = execution_epoch() if self.spec.mode == "train" else 0
        rows, bad = [], []
        for i in range(len(batch["id"])):
            row = {name: column[i] for name, column in batch.items()}
            try:
                rows.append(self.decode_row(row, row_rng(self.spec.seed, epoch, int(row["id"]))))
            except DecodeError as err:
                bad.append((str(row["path"]), int(row["id"]), str(err)))
        if bad:
            self._record(bad)
        return _stack(rows, self.spec)

    def _record(self, bad: list[tuple[str, int, str]]) -> None:
        count, allowed = ray.get(self.ledger.record.remote(self.ledger_key, [(path, rid) for path, rid, _ in bad]))
        if count > allowed:
            path, rid, reason = bad[-1]
            shard = self._display(path)
            message = (
                f"data: shard {shard!r} row {self._row_index(path, rid)} (id {rid}): {reason}; {count} undecodable "
                f"row(s) in split {self.split!r} exceed data.max_bad_fraction={self.spec.max_bad_fraction} "
                f"({allowed} of {self.opened.card.split(self.split).num_rows} rows allowed)"
            )
            ray.get(self.ledger.fail.remote(message))
            raise CorruptDataError(message)

    def _display(self, path: str) -> str:
        _, root = self.opened.filesystem()
        return storage.join(self.opened.uri, path[len(root) :]) if path.startswith(root) else path

    def _row_index(self, path: str, rid: int) -> int | str:
        try:
            fs, _ = self.opened.filesystem()
            ids = pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_numpy()
            return int(np.flatnonzero(ids == rid)[0])
        except Exception:
            return "?"

    # ---- per task ----
    def _image(self, image: np.ndarray) -> np.ndarray:
        """decode: HxWx3 as decoded; train/eval: uint8 3xHxW (normalised on the device: 4x fewer bytes
        through the object store than float32)."""
        return image if self.spec.mode == "decode" else np.ascontiguousarray(image.transpose(2, 0, 1))

    def _classification(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = decode_image(row["image"])
        if self.spec.mode == "train":
            image = T.classification_train(image, self.spec.size, self.spec.augment, rng)
        elif self.spec.mode == "eval":
            image = T.center_crop(image, self.spec.size)
        return {"image": self._image(image), "label": int(row["label"]), "id": int(row["id"])}

    def _segmentation(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """eval keeps the mask at its original size (mIoU is measured there, predictions resized to it)."""
        image, mask = decode_image(row["image"]), decode_mask(row["mask"])
        if mask.shape != image.shape[:2]:
            raise DecodeError(f"mask {list(mask.shape)} and image {list(image.shape[:2])} differ in size")
        num_classes = self.opened.card.num_classes
        labelled = mask[mask != IGNORE_INDEX]
        if labelled.size and int(labelled.max()) >= num_classes:
            raise DecodeError(
                f"mask has class id {int(labelled.max())}, beyond the dataset's {num_classes} classes "
                f"(ids 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)"
            )
        out: dict[str, Any] = {"id": int(row["id"])}
        if self.spec.mode == "train":
            image, mask = T.segmentation_train(image, mask, self.spec.size, self.spec.augment, rng)
        elif self.spec.mode == "eval":
            image = T.resize(image, self.spec.size, self.spec.size)
        return {**out, "image": self._image(image), "mask": mask}

    def _detection(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Boxes are clipped to the image; one left under 1 px wide or high is dropped with its label and
        mask. Labels beyond the class list make the row undecodable. train/eval rows carry `shape`, the
        resized content's (h, w) inside the padded square; eval rows also the original size and the
        original (clipped) boxes and mask annotations, for COCO-style evaluation at the original scale."""
        image = decode_image(row["image"])
        h, w = image.shape[:2]
        if (h, w) != (int(row["height"]), int(row["width"])):
            raise DecodeError(f"image is {w}x{h}, the row says {row['width']}x{row['height']}")
        boxes = np.asarray([list(b) for b in row["boxes"]], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(row["labels"], dtype=np.int64)
        mask_json = list(row["masks"])
        if not len(boxes) == len(labels) == len(mask_json):
            raise DecodeError(f"{len(boxes)} boxes, {len(labels)} labels and {len(mask_json)} masks differ in number")
        num_classes = self.opened.card.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DecodeError(f"label {int(labels.max())} is outside the dataset's {num_classes} classes")
        boxes, keep = T.clip_boxes(boxes, h, w)
        boxes, labels = boxes[keep], labels[keep]
        mask_json = [m for m, k in zip(mask_json, keep, strict=True) if k]
        masks = np.asarray([instance_mask_decode(m, h, w) for m in mask_json], dtype=np.uint8).reshape(-1, h, w)
        out: dict[str, Any] = {"id": int(row["id"])}
        if self.spec.mode == "train":
            image_out, boxes_out, masks_out, shape = T.detection_train(
                image, boxes, masks, self.spec.size, self.spec.augment, rng
            )
            out["shape"] = np.asarray(shape, dtype=np.int64)
        elif self.spec.mode == "eval":
            image_out, boxes_out, masks_out = T.detection_resize(image, boxes, masks, self.spec.size)
            out["shape"] = np.asarray(T.detection_content_shape(h, w, self.spec.size), dtype=np.int64)
            out.update(ori_shape=np.asarray((h, w), dtype=np.int64), gt_boxes=boxes, gt_masks=mask_json)
        else:
            image_out, boxes_out, masks_out = image, boxes, masks
        return {**out, "image": self._image(image_out), "boxes": boxes_out, "labels": labels, "masks": masks_out}


# Keeps augmentation streams apart from any other generator seeded with the same (seed, epoch, id).
_AUGMENT_STREAM = 0x61756721


def row_rng(seed: int, epoch: int, row_id: int) -> np.random.Generator:
    """The generator of one row's augmentation in one epoch: a function of (seed, epoch, row id) only, so the
    draws do not depend on which task, batch or worker decodes the row, nor on the order rows arrive in."""
    return np.random.default_rng([row_id & 0xFFFFFFFFFFFFFFFF, epoch, seed, _AUGMENT_STREAM])


def execution_epoch() -> int:
    """Which pass over the split this decode task belongs to: Ray Data counts the executions of a Dataset
    (a Train worker's every epoch is one) and hands the count to its tasks (the index Ray Data's own seeded
    file shuffles use). The shard order (`shard_order`) and the augmentation of an epoch both follow it.
    A stage builds its Datasets afresh, so its first epoch is 0."""
    from ray.data.context import DataContext

    return int(DataContext.get_current()._execution_idx)


def _stack(rows: list[dict[str, Any]], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Rows → columns: fixed-shape fields stacked, per-row variable ones (instances, original-size masks,
    raw pixels in decode mode) as object arrays."""
    names = ["image", "id", *TASK_FIELDS[spec.task].get(spec.mode, TASK_FIELDS[spec.task]["decode"])]
    ragged = set(RAGGED_FIELDS[spec.task])
    if spec.mode == "decode":
        ragged |= {"image", "mask"}
    elif spec.mode == "eval" and spec.task == "segmentation":
        ragged.add("mask")
    out: dict[str, np.ndarray] = {}
    for name in names:
        values = [row[name] for row in rows]
        if name in ragged:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
        else:
            out[name] = np.asarray(values) if values else np.empty((0,), dtype=np.int64)
    return out


# per task and mode: the fields a decoded row has besides image and id
TASK_FIELDS: dict[str, dict[str, list[str]]] = {
    "classification": {"decode": ["label"]},
    "segmentation": {"decode": ["mask"]},
    "detection": {
        "decode": ["boxes", "labels", "masks"],
        "train": ["boxes", "labels", "masks", "shape"],
        "eval": ["boxes", "labels", "masks", "shape", "ori_shape", "gt_boxes", "gt_masks"],
    },
}
RAGGED_FIELDS = {
    "classification": (),
    "segmentation": (),
    "detection": ("boxes", "labels", "masks", "gt_boxes", "gt_masks"),
}


SPLIT_COLUMNS = {
    "classification": ["image", "label", "id"],
    "segmentation": ["image", "mask", "id"],
    "detection": ["image", "boxes", "labels", "masks", "id", "width", "height"],
}
# Keeps the per-epoch shard order apart from any other generator seeded with the same (seed, epoch).
_SHARD_ORDER_STREAM = 0x73686172


def read_split(
    opened: OpenDataset,
    split: str,
    spec: DecodeSpec,
    ledger: Any,
    *,
    seed: int | None = None,
    batch_size: int = 256,
    ledger_key: str | None = None,
) -> ray.data.Dataset:
    """The split as a Ray Dataset of decoded rows; `seed` shuffles the shard order per epoch (train only).
    `batch_size` is rows per decoded block a task yields (bounds a block's memory for large shards; not the
    training batch). Bad rows count in `ledger` under `ledger_key` (default: the split).

    One block per shard, each read and decoded by one task (`read_and_decode`): the card already lists
    the shards and their row counts, so nothing lists files or reads footers when an epoch starts. Ray
    Data's own parquet reader spent 2-3 s doing that at the start of every execution (every epoch and every
    validation), more than a small stage's training; this plan starts in ~0.1 s once its workers are warm."""
    shards = opened.shard_paths(split)
    fn_kwargs = {
        "spec": spec,
        "split": split,
        "opened": opened,
        "ledger": ledger,
        "ledger_key": ledger_key,
        "shard_paths": shards,
        "seed": seed,
        "rows_per_batch": batch_size,
    }
    items = ray.data.from_items([{"position": i} for i in range(len(shards))], override_num_blocks=len(shards))
    ds = items.map_batches(read_and_decode, fn_kwargs=fn_kwargs, batch_size=1, batch_format="numpy")
    # Ray Data reserves part of the CPUs for each operator of a plan, here the trivial `from_items` too: on a
    # small cluster that left the decode one CPU, so its tasks ran one at a time however many CPUs were free
    # (measured: 8 decode tasks on 3 CPUs in 8 task-lengths). This plan has one operator that works.
    ds.context.op_resource_reservation_enabled = False
    return ds


def shard_order(num_shards: int, seed: int | None, epoch: int) -> np.ndarray:
    """Which shard each position reads in an epoch: in order without a seed, else a permutation that is a
    function of (seed, epoch) only: different in each epoch, the same in every rerun."""
    if seed is None:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, _SHARD_ORDER_STREAM]).permutation(num_shards)


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    spec: DecodeSpec,
    split: str,
    opened: OpenDataset,
    ledger: Any,
    ledger_key: str | None,
    shard_paths: list[str],
    seed: int | None,
    rows_per_batch: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Stateless task-side entry point (tasks scale with the cluster; no actor pool to size): read the
    epoch's shard at each position and yield it decoded, `rows_per_batch` rows at a time."""
    order = shard_order(len(shard_paths), seed, execution_epoch() if seed is not None else 0)
    fs, _ = opened.filesystem()
    decode = DecodeBatch(spec, split, opened, ledger, ledger_key)
    for position in batch["position"]:
        path = shard_paths[order[int(position)]]
        table = pq.read_table(path, columns=SPLIT_COLUMNS[opened.card.task], filesystem=fs)
        for offset in range(0, table.num_rows, rows_per_batch):
            part = table.slice(offset, rows_per_batch)
            columns = {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names}
            columns["path"] = np.full(part.num_rows, path, dtype=object)
            yield decode(columns)


def bad_row_budgets(opened: OpenDataset, max_bad_fraction: float, splits: tuple[str, ...]) -> dict[str, int]:
    """Undecodable rows each split may have before its stage fails."""
    return {s: int(max_bad_fraction * opened.card.split(s).num_rows) for s in splits}


def create_ledger(opened: OpenDataset, max_bad_fraction: float, splits: tuple[str, ...] = ("train", "val")) -> Any:
    """The ledger of one dataset's splits, keyed by split."""
    return DecodeLedger.remote(bad_row_budgets(opened, max_bad_fraction, splits))


class DetectionCollate(NumpyBatchCollateFn):
    """`iter_torch_batches(collate_fn=DetectionCollate())`: images stacked, per-image targets as lists
    (Ray cannot turn ragged columns into one tensor); eval's original annotations pass through."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {
            "image": torch.as_tensor(np.stack(list(batch["image"]))),
            "id": torch.as_tensor(np.asarray(batch["id"], dtype=np.int64)),
            "boxes": [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)) for b in batch["boxes"]],
            "labels": [torch.as_tensor(np.asarray(lab, dtype=np.int64)) for lab in batch["labels"]],
            "masks": [torch.as_tensor(np.asarray(m, dtype=np.uint8)) for m in batch["masks"]],
        }
        for name in ("shape", "ori_shape"):
            if name in batch:
                out[name] = torch.as_tensor(np.asarray(batch[name], dtype=np.int64))
        if "gt_boxes" in batch:
            out["gt_boxes"] = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in batch["gt_boxes"]]
            out["gt_masks"] = [list(m) for m in batch["gt_masks"]]
        return out


class SegmentationEvalCollate(NumpyBatchCollateFn):
    """Validation batches of a segmentation split: images stacked, masks at their original sizes (a list)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        return {
            "image": torch.as_tensor(np.stack(list(batch["image"]))),
            "id": torch.as_tensor(np.asarray(batch["id"], dtype=np.int64)),
            "mask": [torch.as_tensor(np.asarray(m, dtype=np.uint8)) for m in batch["mask"]],
        }
