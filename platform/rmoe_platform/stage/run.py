"""Run one training stage as a Ray Train `TorchTrainer` and return its metrics, checkpoint and cost.

The stage is validated first (`stage.prepare`), so a bad config fails before any worker starts and
before anything is written; the workers get one `WorkerPayload` and run `stage.worker.loop`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback

from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.cost.devices import DEVICES, DeviceSpec
from rmoe_platform.cost.ledger import StageLedger, pop_ledger
from rmoe_platform.main_thread import off_the_main_thread
from rmoe_platform.stage.data import ingest_config, stage_data
from rmoe_platform.stage.payload import WorkerPayload
from rmoe_platform.stage.prepare import prepare_stage
from rmoe_platform.stage.worker.checkpoints import STATE_FILE
from rmoe_platform.stage.worker.loop import train_stage_worker
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.tasks.base import PREDICTIONS_DIR, PREDICTIONS_EXPORTED


@dataclass(frozen=True)
class StageCost:
    """What a stage cost: its measured ledger (where the wall time went; compute is compared, overhead
    reported beside it) and the analytic FLOPs of the samples it trained on."""

    device_kind: str
    device_model: str  # the device table's key of what it ran on ("cpu", "h100", …), or torch's name if unknown
    precision: str
    ledger: StageLedger
    train_flops_per_sample: float
    samples: int

    @property
    def num_workers(self) -> int:
        return self.ledger.num_devices

    @property
    def wall_seconds(self) -> float:
        return self.ledger.wall_seconds

    @property
    def device_seconds(self) -> float:
        """The compared cost: compute (training + evaluation) time × devices."""
        return self.ledger.compute_device_seconds

    @property
    def overhead_device_seconds(self) -> float:
        return self.ledger.overhead_device_seconds

    @property
    def train_flops(self) -> float:
        return self.train_flops_per_sample * self.samples

    @property
    def achieved_flops_per_second(self) -> float | None:
        return self.ledger.achieved_flops_per_second(self.train_flops)

    def mfu(self, devices: Mapping[str, DeviceSpec] = DEVICES) -> float | None:
        """Model FLOP utilisation: achieved FLOP/s ÷ (the device's peak in the stage's precision × devices),
        on a device `devices` knows (None elsewhere): pass the experiment's table (`device_table`), whose
        overrides then count in the measured utilisation as they do in projections."""
        achieved, spec = self.achieved_flops_per_second, devices.get(self.device_model)
        if achieved is None or spec is None:
            return None
        return achieved / (spec.peak(self.precision) * self.num_workers)


@dataclass(frozen=True)
class StageResult:
    name: str
    run_name: str
    metrics: dict[str, Any]
    checkpoint_uri: str | None
    cost: StageCost
    total_steps: int
    metric_name: str = "accuracy"
    head_reinitialized: bool | None = None  # see PreparedStage

    @property
    def metric(self) -> float | None:
        """The validation value of `metric_name` (accuracy, mIoU, bbox_mAP)."""
        return self.metrics.get("val_metric")

    @property
    def predictions_uri(self) -> str | None:
        """The final validation's exported predictions (segmentation, detection), in the final checkpoint."""
        if self.checkpoint_uri is None or not self.metrics.get(PREDICTIONS_EXPORTED):
            return None
        return f"{self.checkpoint_uri.rstrip('/')}/{PREDICTIONS_DIR}"


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
            train_loop_config=WorkerPayload(
                config=config,
                facts=prepared.dataset.card.facts,
                num_train=prepared.num_train,
                parent_checkpoint=prepared.parent_checkpoint,
                resume_from=resume_from,
                s3=access,
            ).to_loop_config(),
            scaling_config=config.scaling.ray_scaling_config(),
            run_config=_run_config(config, run_name, access, callbacks or []),
            datasets=data.datasets,
            dataset_config=ingest_config(),
        )
        fit_started_at = time.time()
        try:
            result = off_the_main_thread(trainer.fit, "stage-fit")
        except Exception as err:
            failure = data.failure()  # too many corrupt images: say so plainly
            if failure is None:
                raise
            raise failure from err
        fit_ended_at = time.time()
        skipped = data.skipped_rows()
    finally:
        data.close()
    metrics = dict(result.metrics or {})
    metrics.update({f"data/skipped_{split}": count for split, count in skipped.items()})
    checkpoint_uri = _checkpoint_uri(config.storage, result.checkpoint.path) if result.checkpoint else None
    ledger = StageLedger.measure(pop_ledger(metrics), fit_started_at, fit_ended_at, config.scaling.num_workers)
    cost = StageCost(
        device_kind=config.scaling.device_kind,
        device_model=str(metrics.get("device_model", config.scaling.device_kind)),
        precision=str(metrics.get("precision", "fp32")),
        ledger=ledger,
        train_flops_per_sample=prepared.train_flops_per_sample,
        samples=int(metrics.get("samples", 0)),
    )
    return StageResult(
        config.name,
        run_name,
        metrics,
        checkpoint_uri,
        cost,
        prepared.total_steps,
        prepared.metric_name,
        prepared.head_reinitialized,
    )


def _check_cpus_left_for_ingest(config: StageConfig) -> None:
    """Ray Data decodes in CPU tasks: if the Train workers take every CPU of the cluster, ingest stalls."""
    scaling = config.scaling
    total = ray.cluster_resources().get("CPU", 0)
    if total - scaling.total_cpus < 1:
        raise ConfigError(
            f"stage.scaling: {scaling.num_workers} worker(s) x {scaling.cpus_per_worker:g} CPU leave none of the "
            f"cluster's {total:g} CPUs for Ray Data's decode tasks "
            "(start Ray with more CPUs or lower resources_per_worker)"
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


def _checkpoint_uri(storage_root: str, path: str) -> str:
    if storage.is_remote(storage_root):
        scheme = storage_root.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path
