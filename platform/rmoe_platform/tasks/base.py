"""The interface between the stage machinery (driver and Train workers) and one task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmoe import ModelSpec
from rmoe.telemetry import MoEAuxSummary
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.datasets.format import DataFacts

PREDICTIONS_DIR = "predictions"  # in a stage's final checkpoint, for the tasks that export them
PREDICTIONS_EXPORTED = "predictions_exported"  # the final report's count of exported predictions


@dataclass
class StepOutput:
    """One training batch's result: the task loss (MoE aux excluded), the aux summary, and the task's
    loss components for the logs."""

    task_loss: torch.Tensor
    aux: MoEAuxSummary
    components: dict[str, float] = field(default_factory=dict)


class StageTask(ABC):
    """One task's side of a stage, built with its dataset's facts (`task_for(name, facts)`)."""

    name: str
    metric_name: str  # the validation metric reported as `val_metric` (higher is better)
    # Whether a training step may leave some trainable parameters without a gradient (data-parallel
    # training must then look for them: DDP's find_unused_parameters).
    may_skip_parameters: bool = False

    def __init__(self, facts: DataFacts) -> None:
        self.facts = facts

    @abstractmethod
    def build(
        self,
        config: StageConfig,
        *,
        parent: Path | None = None,
        resume: Path | None = None,
        load: bool = True,
    ) -> tuple[nn.Module, ModelSpec]:
        """The model the stage trains and the trunk spec its checkpoints carry."""

    @abstractmethod
    def trunk(self, model: nn.Module) -> nn.Module:
        """The timm model (dense or MoE) inside what `build` returned."""

    @abstractmethod
    def collate_fn(self, split: str) -> Callable[[dict[str, Any]], Any] | None:
        """`iter_torch_batches` collate function for the split (None: Ray's default)."""

    def prepare_for_device(self, model: nn.Module, device: torch.device) -> None:  # noqa: B027 (optional hook)
        """Adjust the model once it is on its training device (default: nothing)."""

    @abstractmethod
    def step(self, model: nn.Module, batch: Any, device: torch.device, *, call: nn.Module | None = None) -> StepOutput:
        """Forward one training batch (model in train mode). `call` is what runs the forward (the
        data-parallel wrapper of `model`; default `model` itself); `model` is read for everything else."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, *, export: Path | None = None
    ) -> dict[str, float]:
        """Validation metrics over this worker's batches, combined across workers (accumulated on the
        device, reduced once); includes `val_metric` (the value of `metric_name`) and `val_samples`.
        `export`: a folder for the predictions, where the task writes them (segmentation and detection,
        rank 0; see `mm.evaluation`)."""

    @abstractmethod
    def train_flops_per_sample(self, model: nn.Module, config: StageConfig) -> float:
        """Forward + backward FLOPs of one training image (the trainable set already applied)."""

    def checkpoint_metadata(self, config: StageConfig) -> dict[str, str]:
        """Extra safetensors metadata saying how to rebuild the checkpoint's model."""
        return {"rmoe_task": self.name}
