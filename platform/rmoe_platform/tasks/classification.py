"""Image classification: the timm model itself, cross-entropy, top-1 accuracy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rmoe
from rmoe import ModelSpec
from rmoe import cost as rmoe_cost
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.stage.worker import collectives
from rmoe_platform.stage.worker.model import build_stage_model
from rmoe_platform.tasks.base import DataFacts, StageTask, StepOutput
from rmoe_platform.tasks.normalizer import Normalizer


class ClassificationTask(StageTask):
    name = "classification"
    metric_name = "accuracy"

    def __init__(self, facts: DataFacts) -> None:
        super().__init__(facts)
        self.normalize: Normalizer | None = None

    def build(
        self,
        config: StageConfig,
        *,
        parent: Path | None = None,
        resume: Path | None = None,
        load: bool = True,
    ) -> tuple[nn.Module, ModelSpec]:
        return build_stage_model(config, parent=parent, resume=resume, load=load)

    def trunk(self, model: nn.Module) -> nn.Module:
        return model

    def collate_fn(self, split: str) -> Callable[[dict[str, Any]], Any] | None:
        return None

    def _tensors(self, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.normalize is None or self.normalize.scale.device != device:
            self.normalize = Normalizer(*self.facts.image_stats, device)
        return self.normalize(batch["image"]), batch["label"].to(device, torch.long, non_blocking=True)

    def step(self, model: nn.Module, batch: Any, device: torch.device, *, call: nn.Module | None = None) -> StepOutput:
        images, labels = self._tensors(batch, device)
        logits, aux = rmoe.forward_with_aux(call or model, images)
        return StepOutput(nn.functional.cross_entropy(logits.float(), labels), aux)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, *, export: Path | None = None
    ) -> dict[str, float]:
        """Top-1 accuracy and loss (`export` is not used: a prediction per image is the accuracy)."""
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        for batch in batches:
            images, labels = self._tensors(batch, device)
            logits = model(images).float()
            rmoe.collect_moe_aux(model)
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (logits.argmax(-1) == labels).sum()
            totals[2] += len(labels)
        loss_sum, correct, count = collectives.all_reduce(totals).tolist()
        count = max(count, 1.0)
        accuracy = correct / count
        return {"val_loss": loss_sum / count, "val_accuracy": accuracy, "val_metric": accuracy, "val_samples": count}

    def train_flops_per_sample(self, model: nn.Module, config: StageConfig) -> float:
        breakdown = rmoe_cost.flops_per_image(model)
        return breakdown.forward + breakdown.backward


def without_classes(config: StageConfig) -> StageConfig:
    """The stage config with no classifier swap (dense-prediction heads own the label set)."""
    return replace(config, model=replace(config.model, num_classes=None))
