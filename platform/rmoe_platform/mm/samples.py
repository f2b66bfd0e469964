"""Ray Data batches (uint8 images, targets from the shard format's decode step) → mmseg/mmdet inputs:
a list of CHW image tensors and one data sample per image, as their data preprocessors expect."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.structures import InstanceData, PixelData
from mmseg.structures import SegDataSample

MMInputs = dict[str, Any]  # {"inputs": list[Tensor CHW uint8], "data_samples": list[...]}


def segmentation_inputs(batch: dict[str, Any]) -> MMInputs:
    """Train batches: masks are the crop's (size x size); eval batches: masks at the original image size,
    so predictions are resized back to it (`ori_shape`) and mIoU is measured there."""
    images = batch["image"]
    size = tuple(images.shape[-2:])
    samples = []
    for i, mask in enumerate(batch["mask"]):
        mask_HW = torch.as_tensor(mask).to(torch.long)
        sample = SegDataSample(
            metainfo={"img_shape": size, "ori_shape": tuple(mask_HW.shape), "pad_shape": size, "img_id": _id(batch, i)}
        )
        sample.gt_sem_seg = PixelData(data=mask_HW[None])
        samples.append(sample)
    return {"inputs": list(images), "data_samples": samples}


def detection_inputs(batch: dict[str, Any]) -> MMInputs:
    """`shape` is each image's resized content inside the padded square. Eval batches also carry the
    original size and annotations: predictions are rescaled to it and COCO AP is measured there."""
    images = batch["image"]
    size = tuple(images.shape[-2:])
    samples = []
    for i in range(len(images)):
        content = tuple(int(v) for v in batch["shape"][i])
        original = tuple(int(v) for v in batch["ori_shape"][i]) if "ori_shape" in batch else content
        scale = (content[1] / original[1], content[0] / original[0])  # (w, h), mmdet's order
        sample = DetDataSample(
            metainfo={
                "img_id": _id(batch, i),
                "img_shape": content,
                "ori_shape": original,
                "pad_shape": size,
                "scale_factor": scale,
            }
        )
        masks = np.asarray(batch["masks"][i], dtype=np.uint8).reshape(-1, *size)
        sample.gt_instances = InstanceData(
            bboxes=torch.as_tensor(batch["boxes"][i], dtype=torch.float32).reshape(-1, 4),
            labels=torch.as_tensor(batch["labels"][i], dtype=torch.long),
            masks=BitmapMasks(masks, *size),
        )
        if "gt_boxes" in batch:
            ground_truth = coco_instances(batch["gt_boxes"][i], batch["labels"][i], batch["gt_masks"][i])
            sample.set_field(ground_truth, "instances")
        samples.append(sample)
    return {"inputs": list(images), "data_samples": samples}


def coco_instances(boxes: np.ndarray, labels: Any, masks: list[str]) -> list[dict[str, Any]]:
    """Ground truth as mmdet's `CocoMetric` reads it: xyxy boxes, 0-based labels, COCO RLE/polygons."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    return [
        {"bbox": [float(v) for v in box], "bbox_label": int(label), "ignore_flag": 0, "mask": json.loads(mask)}
        for box, label, mask in zip(np.asarray(boxes).reshape(-1, 4), labels, masks, strict=True)
    ]


def _id(batch: dict[str, Any], i: int) -> int:
    return int(batch["id"][i])
