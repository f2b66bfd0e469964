"""Semantic segmentation: mmseg's UperNet (with an FCN auxiliary head) on the stage's model, mIoU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rmoe_platform.datasets.ingest import SegmentationEvalCollate
from rmoe_platform.mm.evaluation import SegmentationEvaluator
from rmoe_platform.mm.samples import MMInputs, segmentation_inputs
from rmoe_platform.tasks.dense import DenseTask


class SegmentationTask(DenseTask):
    name = "segmentation"
    evaluator_type = SegmentationEvaluator

    def collate_fn(self, split: str) -> Callable[[dict[str, Any]], Any] | None:
        """Validation masks keep each image's original size (mIoU is measured there): a ragged batch."""
        return SegmentationEvalCollate() if split == "val" else None

    def inputs(self, batch: dict[str, Any]) -> MMInputs:
        return segmentation_inputs(batch)

    def blank_batch(self, size: int) -> dict[str, Any]:
        return {"image": torch.zeros(1, 3, size, size, dtype=torch.uint8), "id": [0], "mask": [torch.zeros(size, size)]}
