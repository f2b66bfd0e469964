"""Run one training stage as a Ray Train `TorchTrainer` and return its metrics, checkpoint and cost.

Everything that can be checked without workers is checked first (`prepare_stage`): a bad config
fails with a message naming the field, before any worker starts and before anything is written.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import timm.data
from ray.data import DataContext, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from torch import nn

from rmoe.upcycle import moe_layers
from rmoe_platform import storage
from rmoe_platform.stage.worker.checkpoints import STATE_FILE
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.datasets.checks import check_dataset, ensure_dataset
from rmoe_platform.stage.data import stage_data
from rmoe_platform.datasets.ingest import OpenDataset
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.stage.worker.model import build_stage_model
from rmoe_platform.tasks import task_for
from rmoe_platform.tasks.classification import without_classes
from rmoe_platform.stage.worker.loop import train_stage_worker
from rmoe_platform.stage.worker.trainable import apply_trainable


@dataclass(frozen=True)
class StageCost:
    """What a stage cost: measured device-seconds and analytic FLOPs of the samples it trained on."""

    device_kind: str
    num_workers: int
    wall_seconds: float
    device_seconds: float
    train_flops_per_sample: float
    samples: int

    @property
    def train_flops(self) -> float:
        return self.train_flops_per_sample * self.samples


@dataclass(frozen=True)
class PreparedStage:
    """A validated stage: its config with the dataset-dependent fields resolved, and what it needs."""

    config: StageConfig
    parent_checkpoint: str | None
    train_flops_per_sample: float
    dataset: OpenDataset
    access: S3Access
    metric_name: str

    @property
    def num_train(self) -> int:
        return self.dataset.card.split("train").num_rows

    @property
    def total_steps(self) -> int:
        return self.config.total_steps(self.num_train)


@dataclass(frozen=True)
class StageResult:
    name: str
    run_name: str
    metrics: dict[str, Any]
    checkpoint_uri: str | None
    cost: StageCost
    total_steps: int
    metric_name: str = "accuracy"

    @property
    def metric(self) -> float | None:
        """The validation value of `metric_name` (accuracy, mIoU, bbox_mAP)."""
        return self.metrics.get("val_metric")


def prepare_stage(config: StageConfig, access: S3Access | None = None) -> PreparedStage:
    """Validate what needs the model, the data or the outside world; raises ConfigError naming the field.

    The dataset is generated here when it is absent and `data.generate` is set. The returned config has
    `model.num_classes` (from the dataset's classes) and `data.img_size` (the model's input) filled in.
    """
    access = access or S3Access.resolve(config.s3)
    storage.check_writable(config.storage, field="stage.storage", s3=access)
    checked = check_dataset(config.data, access, field="stage.data")
    if checked.task != config.task:
        raise ConfigError(
            f"stage.data.uri: a {config.task} stage needs {config.task} data; {config.data.uri!r} is {checked.task}"
        )
    try:
        task = task_for(config.task)
    except ImportError as err:
        raise ConfigError(f"stage.task: {err}") from None
    config = _resolve_classes(config, checked.num_classes)
    if config.batch_size > checked.num_train:
        raise ConfigError(
            f"stage.batch_size: {config.batch_size} exceeds the {checked.num_train} train rows of {config.data.uri!r}"
        )
    stats = checked.opened.card.stats if checked.opened is not None else None
    image_stats = (stats.mean, stats.std) if stats is not None else ((0.5,) * 3, (0.25,) * 3)
    parent_uri = config.model.parent_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        parent = _fetch_parent_spec(parent_uri, Path(tmp), access) if parent_uri else None
        try:
            trunk, _ = build_stage_model(without_classes(config), parent=parent, load=False)
            config = _resolve_img_size(config, trunk, strict=config.task == "classification")
            model, spec = task.build(config, image_stats, parent=parent, load=False)
        except ValueError as err:
            raise ConfigError(f"stage.model: {err}") from None
    try:
        apply_trainable(model, config.trainable, freeze_core=spec.moe.freeze_core if spec.moe else True)
    except ValueError as err:
        raise ConfigError(f"stage.{err}") from None
    ep = config.scaling.expert_parallel_size
    for name, layer in moe_layers(model):
        if layer.num_experts % ep:
            raise ConfigError(
                f"stage.scaling.expert_parallel_size: {ep} does not divide num_experts ({layer.num_experts}) of {name}"
            )
    flops = task.train_flops_per_sample(model, config)
    dataset = ensure_dataset(config.data, access, "stage.data", checked)  # written only once all else is valid
    return PreparedStage(config, parent_uri, flops, dataset, access, task.metric_name)


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


def run_stage(
    config: StageConfig,
    *,
    run_name: str | None = None,
    resume_from: str | None = None,
    s3: S3Access | None = None,
    callbacks: list[UserCallback] | None = None,
) -> StageResult:
    """Train the stage on `config.scaling.num_workers` Ray workers; returns once it finished.

    `resume_from` continues from a checkpoint of this stage, whatever worker count wrote it. `s3` is the
    driver's resolved S3 access (default: from `config.s3` and this process's environment). `callbacks`
    see every report on the Train controller (a sweep forwards the evaluations to Ray Tune with one).
    """
    prepared = prepare_stage(config, s3)
    config, access = prepared.config, prepared.access
    if resume_from is not None and not storage.exists(f"{resume_from.rstrip('/')}/{STATE_FILE}", access):
        raise ConfigError(f"resume_from: no training checkpoint at {resume_from!r}")
    _check_cpus_left_for_ingest(config)
    run_name = run_name or f"{config.name}-{uuid.uuid4().hex[:8]}"
    data = stage_data(prepared.dataset, config.task, config.data, config.data.img_size, config.seed)
    try:
        trainer = TorchTrainer(
            train_stage_worker,
            train_loop_config={
                "config": config.to_dict(),
                "parent_checkpoint": prepared.parent_checkpoint,
                "resume_from": resume_from,
                "num_train": prepared.num_train,
                "image_stats": (prepared.dataset.card.stats.mean, prepared.dataset.card.stats.std),
                "classes": list(prepared.dataset.card.classes),
                "s3": access,
            },
            scaling_config=ScalingConfig(
                num_workers=config.scaling.num_workers,
                use_gpu=config.scaling.use_gpu,
                resources_per_worker=config.scaling.resources_per_worker,
            ),
            run_config=_run_config(config, run_name, access, callbacks or []),
            datasets=data.datasets,
            dataset_config=_ingest_config(),
        )
        started = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception as err:
            failure = data.failure()  # too many corrupt images: say so plainly
            if failure is None:
                raise
            raise failure from err
        wall = time.perf_counter() - started
        skipped = data.skipped_rows()
    finally:
        data.close()
    metrics = dict(result.metrics or {})
    metrics.update({f"data/skipped_{split}": count for split, count in skipped.items()})
    samples = int(metrics.get("samples", 0))
    cost = StageCost(
        device_kind=config.scaling.device_kind,
        num_workers=config.scaling.num_workers,
        wall_seconds=wall,
        device_seconds=wall * config.scaling.num_workers,
        train_flops_per_sample=prepared.train_flops_per_sample,
        samples=samples,
    )
    checkpoint_uri = _checkpoint_uri(config.storage, result.checkpoint.path) if result.checkpoint else None
    return StageResult(config.name, run_name, metrics, checkpoint_uri, cost, prepared.total_steps, prepared.metric_name)


def _check_cpus_left_for_ingest(config: StageConfig) -> None:
    """Ray Data decodes in CPU tasks: if the Train workers take every CPU of the cluster, ingest stalls."""
    per_worker = (config.scaling.resources_per_worker or {}).get("CPU", 0 if config.scaling.use_gpu else 1)
    total = ray.cluster_resources().get("CPU", 0)
    if total - per_worker * config.scaling.num_workers < 1:
        raise ConfigError(
            f"stage.scaling: {config.scaling.num_workers} worker(s) x {per_worker} CPU leave none of the cluster's "
            f"{total:g} CPUs for Ray Data's decode tasks (start Ray with more CPUs or lower resources_per_worker)"
        )


def _run_config(config: StageConfig, run_name: str, access: S3Access, callbacks: list[UserCallback]) -> RunConfig:
    storage_path, filesystem = storage.normalize(config.storage), None
    if storage.is_remote(config.storage):
        filesystem, storage_path = storage.filesystem(config.storage, "stage.storage", access)
    return RunConfig(
        name=run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
        failure_config=FailureConfig(max_failures=config.max_failures),
        callbacks=callbacks,
    )


def _ingest_config() -> DataConfig:
    """Stream order preserved, so the seeded shuffle gives the same order on every run."""
    limits = DataContext.get_current().execution_options.resource_limits
    return DataConfig(execution_options=ExecutionOptions(preserve_order=True, resource_limits=limits))


def _fetch_parent_spec(uri: str, tmp: Path, access: S3Access) -> Path:
    model_uri = uri if uri.endswith(".safetensors") else f"{uri.rstrip('/')}/model.safetensors"
    if not storage.exists(model_uri, access):
        raise ConfigError(f"stage.model.parent_checkpoint: no checkpoint at {uri!r}")
    return storage.download(model_uri, tmp, access)


def _checkpoint_uri(storage_root: str, path: str) -> str:
    if storage.is_remote(storage_root):
        scheme = storage_root.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path
