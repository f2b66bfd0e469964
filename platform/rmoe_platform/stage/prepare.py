"""Validate one stage on the driver before anything runs: config, storage, data, model and parallel layout.

Everything that can be checked without workers is checked here: a bad config fails with a message
naming the field, before any worker starts and before anything is written (a dataset to generate is
written last, once all else is valid).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import timm.data
import torch
from torch import nn

from rmoe import ModelSpec
from rmoe.checkpoint import save_state_dict
from rmoe.upcycle import moe_layers
from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.datasets.checks import DatasetCheck, check_dataset, ensure_dataset
from rmoe_platform.datasets.format import DataFacts
from rmoe_platform.datasets.ingest import OpenDataset
from rmoe_platform.stage.worker.checkpoints import MODEL_FILE, checkpoint_spec
from rmoe_platform.stage.worker.model import build_stage_model, model_dir
from rmoe_platform.stage.worker.trainable import apply_trainable
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.tasks import StageTask, task_for
from rmoe_platform.tasks.classification import without_classes


@dataclass(frozen=True)
class PreparedStage:
    """A validated stage: its config with the dataset-dependent fields resolved, and what it needs."""

    config: StageConfig
    parent_checkpoint: str | None
    train_flops_per_sample: float
    dataset: OpenDataset
    access: S3Access
    metric_name: str
    spec: ModelSpec  # what the stage's checkpoints will carry (a chained child is checked against it)
    head_reinitialized: bool | None = None  # a classifier for the stage's classes replaces the parent's

    @property
    def num_train(self) -> int:
        return self.dataset.card.split("train").num_rows

    @property
    def total_steps(self) -> int:
        return self.config.total_steps(self.num_train)


def prepare_stage(
    config: StageConfig, access: S3Access | None = None, *, parent_spec: ModelSpec | None = None
) -> PreparedStage:
    """Validate what needs the model, the data or the outside world; raises ConfigError naming the field.

    The parent's spec is read from `model.parent_checkpoint`, or taken from `parent_spec` when the parent
    has not trained yet (a chained stage: its parent trains first in the same fit). The dataset is
    generated here when it is absent and `data.generate` is set. The returned config has
    `model.num_classes` (from the dataset's classes) and `data.img_size` (the model's input) filled in.
    """
    access = access or S3Access.resolve(config.s3)
    storage.check_writable(config.storage, field="stage.storage", s3=access)
    checked = check_dataset(config.data, access, field="stage.data")
    parent_uri = config.model.parent_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        if parent_spec is not None:
            parent: Path | None = Path(tmp)
            save_state_dict({}, Path(tmp) / MODEL_FILE, spec=parent_spec)
        else:
            parent = _fetch_parent_spec(parent_uri, Path(tmp), access) if parent_uri else None
        config, model, task, spec = check_stage(config, checked, parent=parent)
        head_reinitialized = _new_head(config, parent)
    flops = task.train_flops_per_sample(model, config)
    dataset = ensure_dataset(config.data, access, "stage.data", checked)  # written only once all else is valid
    return PreparedStage(config, parent_uri, flops, dataset, access, task.metric_name, spec, head_reinitialized)


def check_stage(config: StageConfig, checked: DatasetCheck, *, parent: Path | None) -> SizedModel:
    """What a stage's config must agree on with its data and its parent's model: the task, the classes,
    the batch against the train rows, the model (layer selection, residual rank, head) and its
    expert-parallel layout. Returns the stage's model as its run builds it (weights not loaded).
    `parent` is the parent's checkpoint directory; only its spec is read."""
    if checked.task != config.task:
        raise ConfigError(
            f"stage.data.uri: a {config.task} stage needs {config.task} data; {config.data.uri!r} is {checked.task}"
        )
    config = _resolve_classes(config, checked.num_classes)
    if config.batch_size > checked.num_train:
        raise ConfigError(
            f"stage.batch_size: {config.batch_size} exceeds the {checked.num_train} train rows of {config.data.uri!r}"
        )
    sized = build_sized_model(config, checked.facts, parent=parent)
    _check_expert_parallel(sized.config, sized.model)
    return sized


class SizedModel(NamedTuple):
    """A stage's model as a run builds it: the config with its data-dependent fields resolved, the model
    (weights not loaded), its task, and the spec its checkpoints carry (a dense-prediction model's is its
    backbone's)."""

    config: StageConfig
    model: nn.Module
    task: StageTask
    spec: ModelSpec


def build_sized_model(config: StageConfig, facts: DataFacts, *, parent: Path | None) -> SizedModel:
    """The stage's model as a run builds it (weights not loaded), its trainable set applied, and the config
    with `data.img_size` resolved: what validation checks and what the cost is computed from."""
    try:
        task = task_for(config.task, facts)
    except ImportError as err:
        raise ConfigError(f"stage.task: {err}") from None
    try:
        with torch.device("meta"):  # only its input size and patch embedding are read: shapes suffice
            trunk, _ = build_stage_model(without_classes(config), parent=parent, load=False)
        config = _resolve_img_size(config, trunk, strict=config.task == "classification")
        model, spec = task.build(config, parent=parent, load=False)
    except ValueError as err:
        raise ConfigError(f"stage.model: {err}") from None
    try:
        apply_trainable(model, config.trainable, freeze_core=spec.moe.freeze_core if spec.moe else True)
    except ValueError as err:
        raise ConfigError(f"stage.{err}") from None
    return SizedModel(config, model, task, spec)


def _new_head(config: StageConfig, parent: Path | None) -> bool | None:
    """Whether a classification stage swaps its parent's classifier for one of its own classes (None: no
    parent, no classifier, or a parent whose class count is not recorded)."""
    if parent is None or config.task != "classification":
        return None
    parent_classes = checkpoint_spec(model_dir(parent)).model_kwargs.get("num_classes")
    return None if parent_classes is None else parent_classes != config.model.num_classes


def _resolve_classes(config: StageConfig, dataset_classes: int) -> StageConfig:
    wanted = config.model.num_classes
    if wanted is not None and wanted != dataset_classes:
        raise ConfigError(
            f"stage.model.num_classes: {wanted} differs from the {dataset_classes} classes of {config.data.uri!r}"
        )
    return replace(config, model=replace(config.model, num_classes=dataset_classes))


def _resolve_img_size(config: StageConfig, model: nn.Module, *, strict: bool) -> StageConfig:
    """Default the input size to the model's; a classification model with a fixed input size must get
    that size (dense-prediction stages rebuild the trunk at their size, resampling position embeddings)."""
    native = timm.data.resolve_model_data_config(model)["input_size"][-1]
    size = config.data.img_size or native
    fixed = getattr(getattr(model, "patch_embed", None), "strict_img_size", False)
    if strict and fixed and size != native:
        raise ConfigError(
            f"stage.data.img_size: {size} differs from the {native}px input of {config.model.arch} "
            "(set model.kwargs.img_size to match)"
        )
    if config.task == "detection" and size % 32:
        raise ConfigError(f"stage.data.img_size: detection needs a multiple of 32 (FPN strides), got {size}")
    return replace(config, data=replace(config.data, img_size=size))


def _check_expert_parallel(config: StageConfig, model: nn.Module) -> None:
    ep = config.scaling.expert_parallel_size
    for name, layer in moe_layers(model):
        if layer.num_experts % ep:
            raise ConfigError(
                f"stage.scaling.expert_parallel_size: {ep} does not divide num_experts ({layer.num_experts}) of {name}"
            )


def _fetch_parent_spec(uri: str, tmp: Path, access: S3Access) -> Path:
    model_uri = uri if uri.endswith(".safetensors") else f"{uri.rstrip('/')}/model.safetensors"
    if not storage.exists(model_uri, access):
        raise ConfigError(f"stage.model.parent_checkpoint: no checkpoint at {uri!r}")
    return storage.download(model_uri, tmp, access)
