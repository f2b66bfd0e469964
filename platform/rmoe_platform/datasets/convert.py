"""Converters from the usual on-disk layouts into the shard format.

- ImageNet-style: `<root>/<split>/<class>/<image>` (class = folder name; splits `train`, `val`)
- ADE20K-style: `<root>/images/{training,validation}/<name>.jpg` + `<root>/annotations/.../<name>.png`
- COCO: `<root>/annotations/instances_<split>.json` + `<root>/<split>/<file_name>` (e.g. train2017)

Image bytes are copied as they are (never re-encoded), so decoded pixels equal the source's. Source
files that cannot be read are left out and counted in the card (`source.skipped_rows`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmoe_platform.datasets.codec import DecodeError, decode_image, decode_mask, encode_png
from rmoe_platform.datasets.format import IGNORE_INDEX
from rmoe_platform.datasets.writer import DatasetPlan

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class SourceError(ValueError):
    """A source tree that does not have the expected layout (the message names the path)."""


@dataclass(frozen=True)
class Conversion:
    """A plan plus the row maker the writer calls for each shard."""

    plan: DatasetPlan
    items: dict[str, list[Any]]  # per split: what one row is made from
    kind: str
    extra: dict[str, Any]

    def rows(self, split: str, start: int, stop: int) -> Iterator[dict[str, Any]]:
        make = {"imagenet": _imagenet_row, "ade20k": _ade20k_row, "coco": _coco_row}[self.kind]
        for index in range(start, stop):
            try:
                yield make(self.items[split][index], index, self.extra)
            except (DecodeError, OSError) as err:
                print(f"skipped {self.items[split][index]!r}: {err}", file=sys.stderr)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ---- ImageNet ---------------------------------------------------------------------------------------
def imagenet(root: Path, name: str, shard_rows: int = 512) -> Conversion:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise SourceError(f"{train_dir}: no train/ folder of class folders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise SourceError(f"{train_dir}: no class folders")
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[Any]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise SourceError(f"{folder}: missing {split}/ folder")
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in index)
        if unknown:
            raise SourceError(f"{folder}: class folder(s) {', '.join(unknown)} are not in train/")
        items[split] = [
            (str(path), index[c]) for c in classes if (folder / c).is_dir() for path in _images_in(folder / c)
        ]
    source = {"kind": "convert", "format": "imagenet", "root": str(root)}
    plan = _plan(name, "classification", tuple(classes), items, source, shard_rows)
    return Conversion(plan, items, "imagenet", {})


def _imagenet_row(item: tuple[str, int], index: int, extra: dict[str, Any]) -> dict[str, Any]:
    path, label = item
    data = Path(path).read_bytes()
    return {"image": data, "label": label, "id": index, "_pixels": decode_image(data)}


# ---- ADE20K -----------------------------------------------------------------------------------------
ADE_SPLITS = {"train": "training", "val": "validation"}


def ade20k(
    root: Path,
    name: str,
    *,
    num_classes: int = 150,
    reduce_zero_label: bool = True,
    class_names: list[str] | None = None,
    shard_rows: int = 512,
) -> Conversion:
    """`reduce_zero_label`: ADE20K's id 0 ('other') becomes ignore (255) and ids 1..N become 0..N-1."""
    classes = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))
    items: dict[str, list[Any]] = {}
    for split, folder_name in ADE_SPLITS.items():
        images, annotations = root / "images" / folder_name, root / "annotations" / folder_name
        for folder in (images, annotations):
            if not folder.is_dir():
                raise SourceError(f"{folder}: missing (expected images/ and annotations/ with {folder_name}/)")
        masks = {p.stem: p for p in annotations.iterdir() if p.suffix.lower() == ".png"}
        unmatched = [p.name for p in _images_in(images) if p.stem not in masks]
        if unmatched:
            raise SourceError(f"{images}: no annotation for {', '.join(unmatched[:3])}")
        items[split] = [(str(p), str(masks[p.stem])) for p in _images_in(images)]
    source = {"kind": "convert", "format": "ade20k", "root": str(root), "reduce_zero_label": reduce_zero_label}
    plan = _plan(name, "segmentation", classes, items, source, shard_rows)
    return Conversion(plan, items, "ade20k", {"reduce_zero_label": reduce_zero_label, "num_classes": len(classes)})


def _ade20k_row(item: tuple[str, str], index: int, extra: dict[str, Any]) -> dict[str, Any]:
    image_path, mask_path = item
    data = Path(image_path).read_bytes()
    pixels = decode_image(data)
    mask = decode_mask(Path(mask_path).read_bytes())
    if mask.shape != pixels.shape[:2]:
        raise DecodeError(f"annotation {mask_path} is {mask.shape}, image is {pixels.shape[:2]}")
    if extra["reduce_zero_label"]:
        mask = np.where(mask == 0, IGNORE_INDEX, mask.astype(np.int64) - 1).astype(np.uint8)
    labels = mask[mask != IGNORE_INDEX]
    if labels.size and labels.max() >= extra["num_classes"]:
        raise DecodeError(f"annotation {mask_path} has class id {labels.max()} >= {extra['num_classes']} classes")
    return {"image": data, "mask": encode_png(mask), "id": index, "_pixels": pixels}


# ---- COCO -------------------------------------------------------------------------------------------
def coco(root: Path, name: str, *, splits: dict[str, str] | None = None, shard_rows: int = 512) -> Conversion:
    """`splits` maps our split to COCO's (default train→train2017, val→val2017)."""
    splits = splits or {"train": "train2017", "val": "val2017"}
    items: dict[str, list[Any]] = {}
    categories: list[dict[str, Any]] | None = None
    crowd = 0
    for split, coco_split in splits.items():
        path = root / "annotations" / f"instances_{coco_split}.json"
        if not path.is_file():
            raise SourceError(f"{path}: missing COCO annotation file")
        try:
            data = json.loads(path.read_text())
            cats = sorted(data["categories"], key=lambda c: c["id"])
            images, annotations = data["images"], data["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SourceError(f"{path}: not a COCO instances file ({type(err).__name__}: {err})") from None
        if categories is None:
            categories = cats
        elif [c["id"] for c in cats] != [c["id"] for c in categories]:
            raise SourceError(f"{path}: categories differ from the {next(iter(splits))} split's")
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        image_ids = {img["id"] for img in images}
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in annotations:
            _check_annotation(ann, image_ids, label_of, path)
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)
        folder = root / coco_split
        items[split] = [
            (
                str(folder / img["file_name"]),
                img,
                [(label_of[a["category_id"]], a) for a in by_image.get(img["id"], [])],
            )
            for img in sorted(images, key=lambda i: i["id"])
        ]
    classes = tuple(c["name"] for c in categories or [])
    source = {"kind": "convert", "format": "coco", "root": str(root), "splits": splits, "crowd_skipped": crowd}
    plan = _plan(name, "detection", classes, items, source, shard_rows)
    return Conversion(plan, items, "coco", {})


def _check_annotation(ann: dict[str, Any], image_ids: set[int], label_of: dict[int, int], path: Path) -> None:
    """An annotation must name a listed image and category and carry a 4-number bbox (boxes reaching
    outside their image are kept here and clipped at ingest)."""
    where = f"{path}: annotation {ann.get('id', '?')}"
    if ann.get("image_id") not in image_ids:
        raise SourceError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in the file's images")
    if ann.get("category_id") not in label_of:
        raise SourceError(f"{where} has category_id {ann.get('category_id')!r}, which is not in the file's categories")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise SourceError(f"{where} has no [x, y, w, h] bbox (got {bbox!r})")


def _coco_row(item: tuple[str, dict[str, Any], list[Any]], index: int, extra: dict[str, Any]) -> dict[str, Any]:
    path, image, anns = item
    data = Path(path).read_bytes()
    pixels = decode_image(data)
    if pixels.shape[:2] != (image["height"], image["width"]):
        raise DecodeError(
            f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, annotations say {image['width']}x{image['height']}"
        )
    boxes = [[float(x), float(y), float(x + w), float(y + h)] for _, a in anns for x, y, w, h in [a["bbox"]]]
    return {
        "image": data,
        "boxes": boxes,
        "labels": [label for label, _ in anns],
        "masks": [json.dumps(a["segmentation"]) for _, a in anns],
        "id": int(image["id"]),
        "width": int(image["width"]),
        "height": int(image["height"]),
        "_pixels": pixels,
    }


def _plan(
    name: str, task: str, classes: tuple[str, ...], items: dict[str, list[Any]], source: dict[str, Any], shard_rows: int
) -> DatasetPlan:
    for split, rows in items.items():
        if not rows:
            raise SourceError(f"{name}: the {split} split has no images")
    return DatasetPlan(name, task, classes, {s: len(r) for s, r in items.items()}, source, shard_rows)
