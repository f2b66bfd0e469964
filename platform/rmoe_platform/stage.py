"""Run one training stage as a Ray Train `TorchTrainer` and return its metrics, checkpoint and cost.

Everything that can be checked without workers is checked first (`prepare_stage`): a bad config
fails with a message naming the field, before any worker starts and before anything is written.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rmoe import cost as rmoe_cost
from rmoe.upcycle import moe_layers
from rmoe_platform import storage
from rmoe_platform.checkpointing import STATE_FILE
from rmoe_platform.config import StageConfig
from rmoe_platform.configtools import ConfigError
from rmoe_platform.data import build_datasets
from rmoe_platform.stage_model import build_stage_model
from rmoe_platform.train_loop import train_stage_worker
from rmoe_platform.trainable import apply_trainable


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
    config: StageConfig
    parent_checkpoint: str | None
    train_flops_per_sample: float


@dataclass(frozen=True)
class StageResult:
    name: str
    run_name: str
    metrics: dict[str, Any]
    checkpoint_uri: str | None
    cost: StageCost


def prepare_stage(config: StageConfig) -> PreparedStage:
    """Validate what needs the model or the outside world; raises ConfigError naming the field."""
    storage.check_writable(config.storage, field="stage.storage")
    parent_uri = config.model.parent_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        parent = _fetch_parent_spec(parent_uri, Path(tmp)) if parent_uri else None
        try:
            model, spec = build_stage_model(config, parent=parent, load=False)
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
    breakdown = rmoe_cost.flops_per_image(model)
    return PreparedStage(config, parent_uri, breakdown.forward + breakdown.backward)


def run_stage(config: StageConfig, *, run_name: str | None = None, resume_from: str | None = None) -> StageResult:
    """Train the stage on `config.scaling.num_workers` Ray workers; returns once it finished.

    `resume_from` continues from a checkpoint of this stage, whatever worker count wrote it.
    """
    prepared = prepare_stage(config)
    if resume_from is not None and not storage.exists(f"{resume_from.rstrip('/')}/{STATE_FILE}"):
        raise ConfigError(f"resume_from: no training checkpoint at {resume_from!r}")
    run_name = run_name or f"{config.name}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        train_stage_worker,
        train_loop_config={
            "config": config.to_dict(),
            "parent_checkpoint": prepared.parent_checkpoint,
            "resume_from": resume_from,
        },
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=config.scaling.resources_per_worker,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.normalize(config.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets=build_datasets(config.data),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    metrics = dict(result.metrics or {})
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
    return StageResult(config.name, run_name, metrics, checkpoint_uri, cost)


def _fetch_parent_spec(uri: str, tmp: Path) -> Path:
    model_uri = uri if uri.endswith(".safetensors") else f"{uri.rstrip('/')}/model.safetensors"
    if not storage.exists(model_uri):
        raise ConfigError(f"stage.model.parent_checkpoint: no checkpoint at {uri!r}")
    return storage.download(model_uri, tmp)


def _checkpoint_uri(storage_root: str, path: str) -> str:
    if storage.is_remote(storage_root):
        scheme = storage_root.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path
