"""Predictions built from a dataset's stored annotations (decoded here from the Parquet shards, matched by
image id), independently of what the metrics read: perfect, or half wrong. Its own module, so Ray workers
can be sent it by value."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from mmengine.structures import InstanceData, PixelData

from rmoe_platform.datasets.codec import decode_mask, instance_mask_decode


def stored_annotations(uri: str, task: str) -> dict[int, dict[str, Any]]:
    """The val split's annotations by image id, read straight from the shards (no ingest code)."""
    card = json.loads((Path(uri) / "card.json").read_text())
    out: dict[int, dict[str, Any]] = {}
    for shard in card["splits"]["val"]["shards"]:
        for row in pq.read_table(Path(uri) / shard["path"]).to_pylist():
            if task == "segmentation":
                out[row["id"]] = {"mask": decode_mask(row["mask"])}
            else:
                h, w = row["height"], row["width"]
                out[row["id"]] = {
                    "boxes": np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
                    "labels": np.asarray(row["labels"], dtype=np.int64),
                    "masks": np.stack([instance_mask_decode(m, h, w) for m in row["masks"]]).astype(bool),
                }
    return out


class FromAnnotations(torch.nn.Module):
    """A model whose predictions are the given annotations of each image id (nothing from the batch)."""

    def __init__(self, task: str, annotations: dict[int, dict[str, Any]], data_preprocessor: Any) -> None:
        super().__init__()
        self.task, self.annotations = task, annotations
        self.data_preprocessor = data_preprocessor

    def predict(self, inputs: torch.Tensor, samples: list[Any]) -> list[Any]:
        for sample in samples:
            ann = self.annotations[int(sample.img_id)]
            if self.task == "segmentation":
                sample.pred_sem_seg = PixelData(data=torch.from_numpy(ann["mask"].astype(np.int64))[None])
            else:
                sample.pred_instances = InstanceData(
                    bboxes=torch.from_numpy(ann["boxes"]),
                    labels=torch.from_numpy(ann["labels"]),
                    scores=torch.ones(len(ann["labels"])),
                    masks=torch.from_numpy(ann["masks"]),
                )
        return samples


def half_wrong(task: str, truth: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Segmentation: every other image predicted as background throughout. Detection: each class keeps
    the first half (rounded up) of its instances, in image-id order; the rest are missed."""
    if task == "segmentation":
        return {
            i: ({"mask": np.zeros_like(a["mask"])} if n % 2 else a) for n, (i, a) in enumerate(sorted(truth.items()))
        }
    seen: dict[int, int] = {}
    totals = class_counts(truth)
    out = {}
    for image_id, ann in sorted(truth.items()):
        keep = []
        for label in ann["labels"]:
            seen[int(label)] = seen.get(int(label), 0) + 1
            keep.append(seen[int(label)] <= math.ceil(totals[int(label)] / 2))
        keep_mask = np.asarray(keep, dtype=bool)
        out[image_id] = {key: value[keep_mask] for key, value in ann.items()}
    return out


def class_counts(truth: dict[int, dict[str, Any]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for ann in truth.values():
        for label in ann["labels"]:
            counts[int(label)] = counts.get(int(label), 0) + 1
    return counts
