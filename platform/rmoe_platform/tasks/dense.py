"""What the dense-prediction tasks share (segmentation: `tasks.segmentation`, detection: `tasks.detection`):
an OpenMMLab model on the stage's (RMoE) model as backbone. The stage's trunk (fresh, from the parent
checkpoint, upcycled) is built by the classification machinery, rebuilt at the task's input size inside
the mm model, and its weights carried over; the mm model computes its own losses and the MoE aux loss
is added. A subclass says which mm model, which evaluator and how batches become mm inputs."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rmoe
from rmoe import ModelSpec
from rmoe import cost as rmoe_cost
from rmoe.checkpoint import load_weights
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.mm.backbones import RMoEBackbone, load_trunk_weights
from rmoe_platform.mm.build import build_dense_model, mm_scope
from rmoe_platform.mm.evaluation import DetectionEvaluator, SegmentationEvaluator
from rmoe_platform.mm.models import AUX_LOSS_KEY
from rmoe_platform.mm.samples import MMInputs
from rmoe_platform.stage.worker.checkpoints import checkpoint_spec, load_model_state
from rmoe_platform.stage.worker.model import build_stage_model
from rmoe_platform.tasks.base import PREDICTIONS_EXPORTED, StageTask, StepOutput
from rmoe_platform.tasks.classification import without_classes


class DenseTask(StageTask):
    """An mm model (built by `build_dense_model` for `name`) trained and evaluated on the stage's data."""

    evaluator_type: type[SegmentationEvaluator] | type[DetectionEvaluator]
    may_skip_parameters = True  # e.g. a mask head in a step whose RoIs hold no positive sample

    @property
    def metric_name(self) -> str:  # type: ignore[override]
        return self.evaluator_type.metric_name

    @abstractmethod
    def inputs(self, batch: dict[str, Any]) -> MMInputs:
        """A Ray Data batch as the mm model's data preprocessor takes it."""

    @abstractmethod
    def blank_batch(self, size: int) -> dict[str, Any]:
        """One empty image with its (empty) targets: enough metainfo for a tensor-mode forward."""

    # ---- model ----
    def build(
        self,
        config: StageConfig,
        *,
        parent: Path | None = None,
        resume: Path | None = None,
        load: bool = True,
    ) -> tuple[nn.Module, ModelSpec]:
        size, num_classes = config.data.img_size, config.model.num_classes
        assert size is not None and num_classes is not None  # resolved by prepare_stage
        image_stats, head = self.facts.image_stats, config.head.on_workers(config.scaling.use_gpu)
        if resume is not None:
            spec = checkpoint_spec(resume)
            model = build_dense_model(self.name, spec, num_classes, head, image_stats, size)
            if load:
                load_weights(model, load_model_state(resume), source=f"checkpoint {resume}")
            return model, spec
        trunk, spec = build_stage_model(without_classes(config), parent=parent, load=load)
        sized = spec.with_kwargs(img_size=size)
        model = build_dense_model(self.name, sized, num_classes, head, image_stats, size)
        source = f"parent checkpoint {parent}" if parent is not None else "the stage's fresh model"
        load_trunk_weights(self.trunk(model), trunk.state_dict(), source)
        return model, self._backbone(model).spec

    def trunk(self, model: nn.Module) -> nn.Module:
        return self._backbone(model).trunk

    @staticmethod
    def _backbone(model: nn.Module) -> RMoEBackbone:
        backbone = model.backbone
        assert isinstance(backbone, RMoEBackbone)
        return backbone

    def checkpoint_metadata(self, config: StageConfig) -> dict[str, str]:
        return {
            "rmoe_task": self.name,
            "rmoe_head": json.dumps(asdict(config.head.on_workers(config.scaling.use_gpu))),
            "rmoe_num_classes": str(config.model.num_classes),
            "rmoe_img_size": str(config.data.img_size),
            "rmoe_image_stats": json.dumps(self.facts.image_stats),
        }

    # ---- training and evaluation ----
    def prepare_for_device(self, model: nn.Module, device: torch.device) -> None:
        """The data preprocessor copies the images to a GPU without blocking the host."""
        model.data_preprocessor._non_blocking = device.type == "cuda"

    def step(self, model: nn.Module, batch: Any, device: torch.device, *, call: nn.Module | None = None) -> StepOutput:
        with mm_scope(self.name):
            data = model.data_preprocessor(self.inputs(batch), True)
            losses = (call or model)(data["inputs"], data["data_samples"], mode="loss")
        aux = model.last_moe_aux
        losses.pop(AUX_LOSS_KEY)  # the train loop adds aux.loss itself, as for classification
        task_loss, log_vars = model.parse_losses(losses)
        components = {f"loss/{k}": v.detach() for k, v in log_vars.items() if k != "loss"}
        return StepOutput(task_loss, aux, components)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, *, export: Path | None = None
    ) -> dict[str, float]:
        evaluator = self.evaluator_type(self.facts.classes, export)
        count = 0
        for batch in batches:
            with mm_scope(self.name):
                data = model.data_preprocessor(self.inputs(batch), False)
                outputs = model.predict(data["inputs"], data["data_samples"])
            rmoe.collect_moe_aux(model)
            evaluator.process(outputs)
            count += len(outputs)
        metrics, total = evaluator.compute(count)
        out = {f"val_{name}": value for name, value in metrics.items()}
        out.update(val_metric=metrics[self.metric_name], val_samples=float(total))
        if export is not None:
            out[PREDICTIONS_EXPORTED] = float(total)
        return out

    # ---- cost ----
    def train_flops_per_sample(self, model: nn.Module, config: StageConfig) -> float:
        """The trunk analytically (as for classification: MoE routing, frozen parts), plus the feature
        pyramid, neck and heads measured with torch's FLOP counter on one image (x3 for forward and
        backward; Mask R-CNN's RoI heads measured at the test-time proposal count)."""
        size = config.data.img_size
        assert size is not None
        return self.trunk_train_flops(model) + 3.0 * self.head_forward_flops(model, size)

    def trunk_train_flops(self, model: nn.Module) -> float:
        """Forward + backward FLOPs of the trunk, analytically (shapes only: a model on the meta device does)."""
        trunk = rmoe_cost.flops_per_image(self.trunk(model))
        return trunk.forward + trunk.backward

    def head_forward_flops(self, model: nn.Module, size: int) -> float:
        """Forward FLOPs of one image through the pyramid, neck and heads, measured (a model with weights:
        Mask R-CNN's proposals come from its RPN). The same for a dense and an MoE trunk of one arch. The
        trunk runs once, uncounted, and the counted pass starts from its output."""
        was_training = model.training
        model.eval()
        image = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
        samples = self.inputs(self.blank_batch(size))["data_samples"]
        backbone = self._backbone(model)
        try:
            with torch.no_grad(), mm_scope(self.name):
                trunk_features = backbone.trunk_features(image)
                with backbone.replaying_trunk(trunk_features), FlopCounterMode(display=False) as after_trunk:
                    model(image, samples, mode="tensor")
        finally:
            rmoe.collect_moe_aux(model)
            model.train(was_training)
        return float(after_trunk.get_total_flops())
