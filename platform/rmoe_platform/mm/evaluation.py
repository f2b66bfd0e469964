"""Validation metrics of dense-prediction stages with OpenMMLab's own metrics, across Ray Train workers.

Segmentation: mmseg's `IoUMetric`; each worker sums its per-image areas (intersection, union,
prediction, label: plain sums) on the device, the sums are all-reduced once and the metric computed
from them. Detection: mmdet's `CocoMetric` (bbox and segm AP, ground truth from the samples' original
annotations); COCO AP is not a sum, so per-image results are gathered to every rank and evaluated there.
Metrics are fractions in [0, 1] (mmseg reports percentages; they are divided by 100). `compute(count)`
also returns the image count over all workers (`count`: this worker's), reduced with the metric.

With `export` set, rank 0 also writes the validation predictions there, in formats other tools read:
segmentation, one PNG label map per image (`<image id>.png`, class index per pixel, at the original size);
detection, COCO results (`detections.json`: image_id, category_id = class index, xywh bbox, score, RLE
segmentation) beside the ground truth they were scored against (`ground_truth.json`, COCO instances).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmdet.evaluation.metrics import CocoMetric
from mmengine.logging import MMLogger
from mmseg.evaluation.metrics import IoUMetric

from rmoe_platform.datasets.codec import encode_png
from rmoe_platform.stage.worker import collectives

DETECTIONS_FILE, GROUND_TRUTH_FILE = "detections.json", "ground_truth.json"


class SegmentationEvaluator:
    """mIoU (primary), mAcc and aAcc over every image the workers saw."""

    metric_name = "mIoU"

    def __init__(self, classes: Sequence[str], export: Path | None = None) -> None:
        self.metric = IoUMetric(iou_metrics=["mIoU"])
        self.metric.dataset_meta = {"classes": list(classes)}
        self.num_classes = len(classes)
        self.areas: torch.Tensor | None = None  # [4, classes] float64, on the predictions' device
        self.export = export
        self.label_maps: list[tuple[int, bytes]] = []  # (image id, PNG), kept only to export

    def process(self, data_samples: Sequence[Any]) -> None:
        """Samples carrying `pred_sem_seg` and `gt_sem_seg` (at the original size)."""
        self.metric.results.clear()
        self.metric.process({}, [sample.to_dict() for sample in data_samples])
        for result in self.metric.results:
            areas = torch.stack([area.to(torch.float64) for area in result])
            self.areas = areas if self.areas is None else self.areas + areas
        self.metric.results.clear()
        if self.export is not None:
            for sample in data_samples:
                label_map = sample.pred_sem_seg.data.squeeze(0).to(torch.uint8).cpu().numpy()
                self.label_maps.append((int(sample.img_id), encode_png(np.ascontiguousarray(label_map))))

    def compute(self, count: int) -> tuple[dict[str, float], int]:
        areas = self.areas if self.areas is not None else torch.zeros(4, self.num_classes, dtype=torch.float64)
        flat = torch.cat([areas.reshape(-1), areas.new_tensor([float(count)])])
        flat = collectives.all_reduce(flat).cpu()
        areas, total = flat[:-1].view(4, self.num_classes), int(flat[-1])
        with _quiet():
            metrics = self.metric.compute_metrics([tuple(areas)])
        if self.export is not None:
            label_maps = [item for part in collectives.all_gather_objects(self.label_maps) for item in part]
            if collectives.rank() == 0:
                self.export.mkdir(parents=True, exist_ok=True)
                for image_id, png in label_maps:
                    (self.export / f"{image_id}.png").write_bytes(png)
        return {name: float(metrics[name]) / 100.0 for name in ("mIoU", "mAcc", "aAcc")}, total


class DetectionEvaluator:
    """COCO bbox and segm AP (primary: bbox_mAP), at the original image scale."""

    metric_name = "bbox_mAP"
    keys = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")

    def __init__(self, classes: Sequence[str], export: Path | None = None) -> None:
        self.classes = list(classes)
        self.results: list[Any] = []
        self.export = export

    def process(self, data_samples: Sequence[Any]) -> None:
        """Samples carrying `pred_instances` (rescaled to the original size) and `instances` (COCO GT)."""
        metric = self._metric(None)
        metric.process({}, [sample.to_dict() for sample in data_samples])
        self.results.extend(metric.results)

    def compute(self, count: int) -> tuple[dict[str, float], int]:
        gathered = collectives.all_gather_objects((count, self.results))
        total = sum(part[0] for part in gathered)
        results = [item for part in gathered for item in part[1]]
        if not results:
            return dict.fromkeys(self.keys, 0.0), total
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            metrics = self._metric(f"{tmp}/coco").compute_metrics(results)
            if self.export is not None and collectives.rank() == 0:
                self._write_export(Path(tmp) / "coco")
        # an empty prediction set makes CocoMetric skip the metric: that is AP 0
        return {key: max(float(metrics.get(key, 0.0)), 0.0) for key in self.keys}, total

    def _write_export(self, prefix: Path) -> None:
        """CocoMetric wrote the ground truth (`.gt.json`) and the results (`.segm.json`: bbox and RLE mask
        per detection; `.bbox.json` holds the same boxes) it scored: keep those two."""
        assert self.export is not None
        self.export.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f"{prefix}.gt.json", self.export / GROUND_TRUTH_FILE)
        shutil.copyfile(f"{prefix}.segm.json", self.export / DETECTIONS_FILE)

    def _metric(self, outfile_prefix: str | None) -> CocoMetric:
        metric = CocoMetric(metric=["bbox", "segm"], outfile_prefix=outfile_prefix)
        metric.dataset_meta = {"classes": self.classes}
        return metric


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The metrics print per-class tables and COCO summaries (stdout, mmengine's logger): the numbers
    that matter are returned and reported; the tables would drown the stage's log."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
