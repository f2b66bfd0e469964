"""Downstream segmentation and detection on OpenMMLab: registered backbones, training steps, the stage's
evaluation path, bad annotations, and a segmentation pipeline end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from mm_models import NANO, NANO_CHANNELS, nano_model, training_batch

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.datasets import AugmentSpec, SceneRecipe, write_dataset
from rmoe_platform.datasets.codec import decode_mask, encode_png, rle_encode
from rmoe_platform.datasets.convert import SourceError, coco
from rmoe_platform.datasets.ingest import (
    CorruptDataError,
    DecodeBatch,
    DecodeSpec,
    create_ledger,
    open_dataset,
)
from rmoe_platform.mm import load_dense_model
from rmoe_platform.mm.build import mm_scope
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.stage.worker.trainable import apply_trainable, group_members
from rmoe_platform.tasks import DataFacts, task_for

ROOT = Path(__file__).resolve().parents[1]


def training_inputs(task: str) -> dict[str, Any]:
    return training_batch(task, 2, seed=0)


def train_step(task: str, model: torch.nn.Module) -> dict[str, Any]:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with mm_scope(task):
        data = model.data_preprocessor(training_inputs(task), True)
        losses = model.loss(data["inputs"], data["data_samples"])
    loss, _ = model.parse_losses(losses)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return losses


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_registered_backbone_builds_from_a_plain_config_and_trains(task: str) -> None:
    model = nano_model(task)
    features = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 64 // s, 64 // s) for c, s in zip(NANO_CHANNELS, (4, 8, 16, 32), strict=True)
    ]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_step(task, model)
    assert "loss_moe_aux" in losses and float(losses["loss_moe_aux"]) > 0  # the MoE aux loss joins the task loss
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(n.startswith("backbone.") and ".router." in n for n in changed)
    assert any(not n.startswith("backbone.") for n in changed)
    stock = nano_model(task, stock=True)  # mmseg's/mmdet's own EncoderDecoder/MaskRCNN take the backbone too
    assert type(stock).__name__ in ("EncoderDecoder", "MaskRCNN")
    train_step(task, stock)


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_residual_only_training_leaves_the_core_untouched(task: str) -> None:
    model = nano_model(task, residual=True)
    apply_trainable(model, ["residual", "router"])
    core = group_members(model, "core")
    residual = group_members(model, "residual")
    assert core and residual
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    train_step(task, model)
    assert all(torch.equal(params[n], before[n]) for n in core)
    assert any(not torch.equal(params[n], before[n]) for n in residual)
    heads = [n for n in params if not n.startswith("backbone.")]
    assert all(torch.equal(params[n], before[n]) for n in heads)


@pytest.mark.parametrize(
    ("task", "heads"),
    [("segmentation", {"decode_head", "auxiliary_head"}), ("detection", {"neck", "rpn_head", "roi_head"})],
)
def test_the_head_group_trains_everything_but_the_backbone(task: str, heads: set[str]) -> None:
    model = nano_model(task)
    members = group_members(model, "head")
    assert {name.split(".")[0] for name in members} == heads
    count = apply_trainable(model, ["head"])
    assert count == sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in heads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


# ---- bad annotations ------------------------------------------------------------------------------------
def _segmentation_dataset(tmp_path: Path) -> Any:
    recipe = SceneRecipe(task="segmentation", num_train=8, num_val=4, img_size=32, num_classes=3)
    write_dataset(str(tmp_path / "seg"), recipe.plan("seg"), recipe.rows, progress=False)
    return open_dataset(str(tmp_path / "seg"))


def test_mask_class_ids_beyond_the_class_count_fail_naming_the_row(ray_local, tmp_path: Path) -> None:
    opened = _segmentation_dataset(tmp_path)  # classes: background + 3 shapes → ids 0..3
    bad = np.zeros((32, 32), np.uint8)
    bad[4:8, 4:8] = 9
    ignore = np.full((32, 32), 255, np.uint8)  # ignore pixels are fine
    image = encode_png(np.zeros((32, 32, 3), np.uint8))
    batch = {
        "image": np.array([image, image], dtype=object),
        "mask": np.array([encode_png(ignore), encode_png(bad)], dtype=object),
        "id": np.array([0, 1]),
        "path": np.array(["a.parquet", "a.parquet"], dtype=object),
    }
    ledger = create_ledger(opened, 0.0)
    try:
        spec = DecodeSpec("segmentation", "train", 32, AugmentSpec(), 0.0)
        with pytest.raises(CorruptDataError, match=r"id 1\): mask has class id 9, beyond the dataset's 4 classes"):
            DecodeBatch(spec, "train", opened, ledger)(batch)
    finally:
        ray.kill(ledger)


def test_boxes_are_clipped_to_the_image_and_dropped_when_outside(tmp_path: Path) -> None:
    recipe = SceneRecipe(task="detection", num_train=4, num_val=4, img_size=32, num_classes=3)
    write_dataset(str(tmp_path / "det"), recipe.plan("det"), recipe.rows, progress=False)
    opened = open_dataset(str(tmp_path / "det"))
    full = np.ones((32, 40), np.uint8)
    mask = json.dumps(rle_encode(full))
    row = {
        "image": encode_png(np.zeros((32, 40, 3), np.uint8)),
        "boxes": [[-5.0, -3.0, 20.0, 10.0], [45.0, 0.0, 60.0, 10.0], [0.0, 31.5, 40.0, 50.0]],
        "labels": [0, 1, 2],
        "masks": [mask, mask, mask],
        "id": 5,
        "width": 40,
        "height": 32,
    }
    decode = DecodeBatch(DecodeSpec("detection", "eval", 64, AugmentSpec(), 0.0), "val", opened, None)
    out = decode._detection(row, np.random.default_rng(0))
    np.testing.assert_array_equal(out["gt_boxes"], [[0, 0, 20, 10]])  # clipped; the other two lie outside
    np.testing.assert_array_equal(out["labels"], [0])
    assert len(out["gt_masks"]) == 1 and out["masks"].shape == (1, 64, 64)
    np.testing.assert_allclose(out["boxes"], [[0, 0, 32, 16]], atol=0.1)  # 40x32 → 64x51 px
    row["labels"] = [0, 1, 7]
    with pytest.raises(Exception, match="label 7 is outside the dataset's 3 classes"):
        decode._detection(row, np.random.default_rng(0))


def test_coco_annotation_for_a_missing_image_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    instances = {
        "images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}],
        "annotations": [{"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    with pytest.raises(SourceError, match="annotation 11 refers to image_id 2, which is not in the file's images"):
        coco(root, "orphans")
    instances["annotations"][0].update(image_id=1, category_id=5)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(instances))
    with pytest.raises(SourceError, match="category_id 5"):
        coco(root, "orphans")


# ---- stages and pipelines ---------------------------------------------------------------------------------
def test_a_dense_stage_refuses_data_of_another_task(tmp_path: Path) -> None:
    config = StageConfig.from_dict(
        {
            "name": "seg",
            "task": "segmentation",
            "model": {"arch": NANO},
            "data": {"uri": str(tmp_path / "cls"), "generate": {"num_train": 8, "num_val": 4, "img_size": 64}},
            "storage": str(tmp_path / "runs"),
            "batch_size": 4,
        }
    )
    from rmoe_platform.stage.prepare import prepare_stage

    with pytest.raises(ConfigError, match="a segmentation stage needs segmentation data"):
        prepare_stage(config)
    assert not (tmp_path / "cls").exists()


@pytest.mark.parametrize(
    "preset", ["seg_demo", "det_demo", "paper/ade20k_upernet_swin_t", "paper/coco_mask_rcnn_swin_t_1x"]
)
def test_dense_presets_plan_five_pipelines(preset: str) -> None:
    from rmoe_platform.pipelines.graph import plan_pipelines

    exp = ExperimentConfig.load(ROOT / "configs" / f"{preset}.yaml")
    plans = plan_pipelines(exp)
    assert set(plans) == {"dense", "moe", "rmoe_i", "rmoe_d", "upcycle"}
    for stages in plans.values():
        assert stages[-1].config.task == exp.downstream.task != "classification"
        assert all(s.config.task == "classification" for s in stages[:-1])


@pytest.mark.slow
def test_segmentation_pipeline_improves_miou_end_to_end(ray_local, tmp_path: Path) -> None:
    exp = ExperimentConfig.load(
        ROOT / "configs" / "seg_demo.yaml",
        [
            "pipelines=[rmoe_d]",
            f"storage={tmp_path / 'ckpt'}",
            f"results={tmp_path / 'results'}",
            f"data.uri={tmp_path / 'data'}",
            "upstream.data.generate.num_train=256",
            "upstream.data.generate.num_val=64",
            "upstream.budget={steps: 8}",
            "downstream.data.generate.num_train=256",
            "downstream.data.generate.num_val=32",
            "downstream.budget={steps: 64}",
            "downstream.optim.lr=1.0e-3",
            "batch_size=16",
            "moe_scaling={num_workers: 2, expert_parallel_size: 2}",
        ],
    )
    store = ResultsStore(exp.results)
    report = ExperimentRunner(exp, store, log=lambda _: None).run()
    assert report.ok, {k: o.error for k, o in report.outcomes.items()}
    rows = [r for r in store.read().table.to_pylist() if r["stage"] == "rmoe_d/downstream" and r["row_type"] == "stage"]
    assert len(rows) == 1
    row = rows[0]
    metrics = json.loads(row["metrics"])
    assert row["task"] == "segmentation" and row["metric_name"] == "mIoU"
    assert row["metric"] == metrics["val_mIoU"] and metrics["val_samples"] == 32
    initial = metrics["initial/val_mIoU"]
    assert row["metric"] > max(3 * initial, initial + 0.08), (initial, row["metric"])
    assert row["flops"] > 0 and row["num_experts"] == 4
    pipeline = [r for r in store.read().table.to_pylist() if r["row_type"] == "pipeline"]
    assert pipeline[0]["metric_name"] == "mIoU" and pipeline[0]["metric"] == row["metric"]
    assert row["num_workers"] == 2, "expert parallel over 2 workers"
    # the exported label maps, scored against the dataset's stored masks by a plain confusion matrix
    from dense_predictions import stored_annotations
    from test_dense_metrics import confusion_miou

    truth = stored_annotations(exp.datasets()["experiment.downstream.data"].uri, "segmentation")
    exported = Path(row["predictions_uri"])
    assert exported == Path(row["checkpoint_uri"]) / "predictions"
    predicted = {int(p.stem): {"mask": decode_mask(p.read_bytes())} for p in exported.glob("*.png")}
    assert predicted.keys() == truth.keys()
    assert confusion_miou(truth, predicted) == pytest.approx(row["metric"], abs=1e-4)
    # the trained model reloads from its checkpoint alone, for inference
    model = load_dense_model(row["checkpoint_uri"])
    assert type(model).__name__ == "RMoEEncoderDecoder" and model.backbone.spec.is_moe
    with mm_scope("segmentation"), torch.no_grad():
        data = model.data_preprocessor(training_inputs("segmentation"), False)
        predictions = model.predict(data["inputs"], data["data_samples"])
    assert predictions[0].pred_sem_seg.data.shape == (1, 64, 64)


@pytest.mark.parametrize(("task", "use_gpu"), [("segmentation", False), ("segmentation", True), ("detection", False)])
def test_syncbn_on_gpu_workers_and_bn_on_cpu_workers(tmp_path: Path, task: str, use_gpu: bool) -> None:
    """SyncBN needs GPU workers (torch's SyncBatchNorm refuses CPU tensors): CPU workers build BN and the
    checkpoint says so; `none` leaves Mask R-CNN's FPN and mask head without a norm, as mmdet publishes it."""
    from rmoe_platform.config.stage import HeadConfig

    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    config = StageConfig.from_dict(
        {
            "name": "n",
            "task": task,
            "model": {"arch": NANO, "num_classes": 4},
            "head": {"channels": 32, "fc_channels": 64, "norm": "SyncBN"},
            "data": {"uri": str(tmp_path), "img_size": 64},
            "scaling": {"use_gpu": use_gpu},
        }
    )
    model, _ = task_for(task, DataFacts(*stats, ("a", "b", "c", "d"))).build(config)
    norms = {
        type(m).__name__
        for n, m in model.named_modules()
        if not n.startswith("backbone") and "Norm" in type(m).__name__
    }
    assert norms == ({"SyncBatchNorm"} if use_gpu else {"BatchNorm2d"})
    recorded = json.loads(task_for(task, DataFacts(*stats, ("a",))).checkpoint_metadata(config)["rmoe_head"])["norm"]
    assert recorded == ("SyncBN" if use_gpu else "BN")
    if task == "detection":
        plain = dataclasses.replace(config, head=HeadConfig(channels=32, fc_channels=64, norm="none"))
        model, _ = task_for(task, DataFacts(*stats, ("a", "b", "c", "d"))).build(plain)
        assert not any("Norm" in type(m).__name__ for n, m in model.named_modules() if not n.startswith("backbone"))
