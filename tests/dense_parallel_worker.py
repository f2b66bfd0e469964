"""The workers' side of `test_dense_parallel.py`, shipped to the Ray workers by value (they cannot import
tests/): library imports are inside the functions, and `nano_model` is a global of a by-value module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dense_predictions import FromAnnotations, half_wrong, stored_annotations
from mm_models import nano_model, training_batch  # globals, so they travel by value with the functions that use them

TASKS = ("segmentation", "detection")
PER_WORKER = 4
SAMPLER_SEED = 1234


def build(task: str) -> Any:
    import torch

    from rmoe.moe import AuxLossWeights
    from rmoe.upcycle import moe_layers

    torch.manual_seed(0)
    model = nano_model(task)  # MoE backbone, 2 experts: one per EP rank
    for _, layer in moe_layers(model):
        layer.aux_weights = AuxLossWeights(importance=0.0)
    return model


def half(batch: dict[str, Any], index: int) -> dict[str, Any]:
    part = slice(index * PER_WORKER, (index + 1) * PER_WORKER)
    return {"inputs": batch["inputs"][part], "data_samples": batch["data_samples"][part]}


def half_loss(task: str, model: Any, call: Any, batch: dict[str, Any]) -> Any:
    import torch

    from rmoe_platform.mm.build import mm_scope
    from rmoe_platform.mm.models import AUX_LOSS_KEY

    torch.manual_seed(SAMPLER_SEED)  # the RoI/anchor samplers draw the same on a worker and in the reference
    with mm_scope(task):
        data = model.data_preprocessor(batch, True)
        losses = call(data["inputs"], data["data_samples"], mode="loss")
    losses.pop(AUX_LOSS_KEY)
    loss, _ = model.parse_losses(losses)
    return loss


def val_batches(task: str, uri: str, rows: slice) -> list[dict[str, Any]]:
    """Validation batches as the stage's ingest makes them (eval decode + the task's collate), Ray-free."""
    import numpy as np
    import pyarrow.parquet as pq

    from rmoe_platform.datasets import AugmentSpec
    from rmoe_platform.datasets.ingest import (
        DecodeBatch,
        DecodeSpec,
        DetectionCollate,
        SegmentationEvalCollate,
        open_dataset,
    )

    opened = open_dataset(uri)
    table = [r for s in opened.card.split("val").shards for r in pq.read_table(Path(uri) / s.path).to_pylist()]
    decode = DecodeBatch(DecodeSpec(task, "eval", 64, AugmentSpec(), 0.0), "val", opened, None)
    collate = DetectionCollate() if task == "detection" else SegmentationEvalCollate()
    batches = []
    selected = table[rows]
    for start in range(0, len(selected), 3):
        chunk = selected[start : start + 3]
        columns = {}
        for key in chunk[0]:
            column = np.empty(len(chunk), dtype=object)
            column[:] = [row[key] for row in chunk] if key != "path" else ["val"] * len(chunk)
            columns[key] = column
        batches.append(collate(decode(columns)))
    return batches


def evaluate(task: str, uri: str, rows: slice) -> dict[str, float]:
    """The stage's evaluation of `rows` of the val split, predicted half wrong from the stored annotations
    (so the metric is neither 0 nor 1)."""
    import torch

    from rmoe_platform.datasets.ingest import open_dataset
    from rmoe_platform.tasks import DataFacts, task_for

    card = open_dataset(uri).card
    dense = task_for(task, DataFacts(card.stats.mean, card.stats.std, card.classes))
    predictor = FromAnnotations(
        task, half_wrong(task, stored_annotations(uri, task)), nano_model(task).data_preprocessor
    )
    return dense.evaluate(predictor, val_batches(task, uri, rows), torch.device("cpu"))


def dense_ep_worker(config: dict) -> None:
    import ray.train
    from safetensors.torch import save_file

    from rmoe_platform.stage.worker import collectives
    from rmoe_platform.stage.worker.expert_parallel import parallelize

    rank = collectives.rank()
    for task in TASKS:
        model = build(task)
        plan = parallelize(model, ep_size=2, find_unused_parameters=True)
        model.train()
        loss = half_loss(task, model, plan.module, half(training_batch(task, 2 * PER_WORKER), rank))
        loss.backward()
        plan.sync_expert_gradients()
        mean_loss = collectives.all_reduce(loss.detach().clone(), op="avg")
        grads = {
            name: plan.gather_experts(p.grad) if name in plan.expert_params else p.grad.clone().contiguous()
            for name, p in model.named_parameters()
            if p.grad is not None
        }
        per_worker = config["val_rows"] // 2
        metrics = evaluate(task, config["data"][task], slice(rank * per_worker, (rank + 1) * per_worker))
        Path(f"{config['out']}/{task}_metrics_{rank}.json").write_text(json.dumps(metrics))
        if rank == 0:
            grads["__loss__"] = mean_loss.reshape(1)
            save_file(grads, f"{config['out']}/{task}_grads.safetensors")
    ray.train.report({"done": 1})
