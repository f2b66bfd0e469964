"""Detection and instance segmentation: mmdet's Mask R-CNN (FPN, RPN, box and mask heads) on the stage's
model, COCO bbox mAP (and segm mAP)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rmoe_platform.datasets.ingest import DetectionCollate
from rmoe_platform.mm.evaluation import DetectionEvaluator
from rmoe_platform.mm.samples import MMInputs, detection_inputs
from rmoe_platform.tasks.dense import DenseTask


class DetectionTask(DenseTask):
    name = "detection"
    evaluator_type = DetectionEvaluator

    def collate_fn(self, split: str) -> Callable[[dict[str, Any]], Any] | None:
        """Boxes, labels and masks differ in count per image: a ragged batch in both splits."""
        return DetectionCollate()

    def inputs(self, batch: dict[str, Any]) -> MMInputs:
        return detection_inputs(batch)

    def blank_batch(self, size: int) -> dict[str, Any]:
        return {
            "image": torch.zeros(1, 3, size, size, dtype=torch.uint8),
            "id": [0],
            "shape": [(size, size)],
            "boxes": [torch.zeros(0, 4)],
            "labels": [torch.zeros(0, dtype=torch.long)],
            "masks": [torch.zeros(0, size, size, dtype=torch.uint8)],
        }
