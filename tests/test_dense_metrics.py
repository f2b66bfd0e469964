"""The dense-prediction metrics through the stage's evaluation path (Ray Data batches → task.evaluate), fed
predictions built independently of what the metric reads: from the dataset's stored masks and boxes,
decoded here from the Parquet shards, matched by image id. Perfect predictions score 1; a crafted
half-wrong set scores the value computed by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from dense_predictions import FromAnnotations, class_counts, half_wrong, stored_annotations

from rmoe_platform.datasets import AugmentSpec, SceneRecipe, write_dataset
from rmoe_platform.datasets.ingest import DecodeSpec, create_ledger, open_dataset, read_split
from rmoe_platform.tasks import DataFacts, task_for

SIZE = 48


def evaluate(task: str, uri: str, predictions: dict[int, dict[str, Any]]) -> dict[str, float]:
    from mm_models import nano_model

    opened = open_dataset(uri)
    ledger = create_ledger(opened, 0.0)
    try:
        val = read_split(opened, "val", DecodeSpec(task, "eval", 64, AugmentSpec(), 0.0), ledger)
        stats = opened.card.stats
        dense = task_for(task, DataFacts(stats.mean, stats.std, opened.card.classes))
        batches = val.iter_torch_batches(batch_size=5, collate_fn=dense.collate_fn("val"))
        model = FromAnnotations(task, predictions, nano_model(task).data_preprocessor)
        return dense.evaluate(model, batches, torch.device("cpu"))
    finally:
        ray.kill(ledger)


@pytest.fixture(params=["segmentation", "detection"])
def dataset(request, tmp_path: Path) -> tuple[str, str]:
    task = request.param
    recipe = SceneRecipe(task=task, num_train=4, num_val=14, img_size=SIZE, num_classes=3, shard_rows=5, seed=3)
    uri = str(tmp_path / task)
    write_dataset(uri, recipe.plan(task), recipe.rows, progress=False)
    return task, uri


def test_predictions_equal_to_the_stored_annotations_score_one(ray_local, dataset) -> None:
    task, uri = dataset
    metrics = evaluate(task, uri, stored_annotations(uri, task))
    assert metrics["val_samples"] == 14
    keys = ("val_mIoU", "val_aAcc") if task == "segmentation" else ("val_bbox_mAP", "val_segm_mAP")
    for key in keys:
        assert metrics[key] == pytest.approx(1.0), key


def test_a_half_wrong_prediction_scores_what_is_computed_by_hand(ray_local, dataset) -> None:
    task, uri = dataset
    truth = stored_annotations(uri, task)
    metrics = evaluate(task, uri, half_wrong(task, truth))
    if task == "segmentation":
        # mmseg rounds its percentages to two decimals: 1e-4 as a fraction
        assert metrics["val_mIoU"] == pytest.approx(confusion_miou(truth, half_wrong(task, truth)), abs=1e-4)
    else:
        expected = half_detected_ap(truth)
        assert metrics["val_bbox_mAP"] == pytest.approx(expected, abs=1e-3)
        assert metrics["val_segm_mAP"] == pytest.approx(expected, abs=1e-3)


def half_detected_ap(truth: dict[int, dict[str, Any]]) -> float:
    """COCO AP of exact detections (score 1) of k of a class's n objects: precision 1 up to recall k/n and
    nothing beyond, so of the 101 recall thresholds 0, 0.01, …, 1 the first floor(100·k/n) + 1 count;
    the same at every IoU threshold; averaged over the classes."""
    aps = []
    for n in class_counts(truth).values():
        k = math.ceil(n / 2)
        aps.append((math.floor(100 * k / n + 1e-9) + 1) / 101)
    return float(np.mean(aps))


def confusion_miou(truth: dict[int, dict[str, Any]], predicted: dict[int, dict[str, Any]]) -> float:
    """mIoU from one confusion matrix over all images (255 ignored), classes that never occur skipped."""
    classes = 256
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for image_id, ann in truth.items():
        label, pred = ann["mask"].reshape(-1), predicted[image_id]["mask"].reshape(-1)
        keep = label != 255
        np.add.at(matrix, (label[keep], pred[keep]), 1)
    intersection = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean())
