"""Run one training stage, or a chain of stages (a core and the stages built on it), as one Ray Train
`TorchTrainer` fit and return each stage's metrics, checkpoint and cost.

Every stage is validated first (`stage.prepare`), so a bad config fails before any worker starts and
before anything is written; the workers get one `WorkerPayload` per stage and run `stage.worker.loop`.
Chaining saves a stage the start of Ray Train (controller, worker group, process group) and of its worker
processes (imports): about 12 s per chained stage on local Ray.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.result import Result

from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.cost.devices import DEVICES, DeviceSpec
from rmoe_platform.cost.ledger import LEDGER_PREFIX, StageLedger, pop_ledger
from rmoe_platform.main_thread import off_the_main_thread
from rmoe_platform.stage.checkpoint_names import checkpoint_dir_name, owner_prefix, parse_checkpoint_dir
from rmoe_platform.stage.data import FitData, StageInput, fit_data, ingest_config
from rmoe_platform.stage.payload import WorkerPayload, to_loop_config
from rmoe_platform.stage.prepare import PreparedStage, prepare_stage
from rmoe_platform.stage.retention import prune_checkpoints
from rmoe_platform.stage.worker.checkpoints import STATE_FILE
from rmoe_platform.stage.worker.entry import train_fit_worker
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
    window: tuple[float, float] = (0.0, 0.0)  # the wall-clock seconds its ledger charges: from, to

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


@dataclass(frozen=True)
class ChainLink:
    """One stage of a fit: its config, its run name (its rows and checkpoints name it), for an interrupted
    run of it the checkpoint to resume from, and which earlier stage of the fit is its parent."""

    config: StageConfig
    run_name: str
    resume_from: str | None = None
    parent: int | None = None  # the earlier stage of the fit it starts from (None: its config's parent)


@dataclass(frozen=True)
class ChainResult:
    """The stages of a chain that finished, in order, and why the next one did not (None: all finished)."""

    finished: tuple[StageResult, ...]
    error: Exception | None = None


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
    link = ChainLink(config, run_name or f"{config.name}-{uuid.uuid4().hex[:8]}", resume_from)
    chain = run_chain([link], s3=s3, callbacks=callbacks)
    if chain.error is not None:
        raise chain.error
    return chain.finished[0]


def run_chain(
    links: Sequence[ChainLink], *, s3: S3Access | None = None, callbacks: list[UserCallback] | None = None
) -> ChainResult:
    """Train stages one after the other in one fit: one worker group and one Ray Train start for them all (the
    run is named after the first). A stage may start from an earlier one's final checkpoint (`ChainLink.parent`:
    its `model.parent_checkpoint` is set here). Every stage is validated before any trains (a later stage
    against the spec its parent will write); a failure after that ends the fit (`ChainResult.error`) and leaves
    the stages before it finished, their checkpoints whole. Each stage keeps its newest `checkpoint.keep`
    checkpoints (pruned once the fit ends)."""
    if not links:
        raise ValueError("run_chain: no stages")
    if any(link.config.scaling != links[0].config.scaling for link in links):
        raise ConfigError("stage.scaling: a chain's stages run on one worker group; their scaling must agree")
    fit_run = links[0].run_name
    prepared = _prepare_links(links, fit_run, s3)
    access, head = prepared[0].access, prepared[0].config
    for link in links:
        if link.resume_from is not None and not storage.exists(f"{link.resume_from.rstrip('/')}/{STATE_FILE}", access):
            raise ConfigError(f"resume_from: no training checkpoint at {link.resume_from!r}")
    _check_cpus_left_for_ingest(head)
    payloads = [_payload(link, stage, i, fit_run) for i, (link, stage) in enumerate(zip(links, prepared, strict=True))]
    keep = head.checkpoint.keep if len(links) == 1 else None  # a chain prunes per stage (Ray would per fit)
    max_failures = max(link.config.max_failures for link in links)
    error: Exception | None = None
    data = fit_data([_stage_input(stage, payload) for stage, payload in zip(prepared, payloads, strict=True)])
    try:
        trainer = TorchTrainer(
            train_fit_worker,
            train_loop_config=to_loop_config(payloads),
            scaling_config=head.scaling.ray_scaling_config(),
            run_config=_run_config(head, fit_run, access, callbacks or [], keep, max_failures),
            datasets=data.datasets,
            dataset_config=ingest_config([p.train_dataset for p in payloads], head.scaling.num_workers),
        )
        fit_started_at = time.time()
        try:
            reports = _reports(off_the_main_thread(trainer.fit, "stage-fit"))
        except Exception as err:
            error = _explain(err, data)
            reports = _reports_after_failure(head.storage, fit_run, access) if len(links) > 1 else []
        fit_ended_at = time.time()
        skipped = data.skipped_rows()
    finally:
        data.close()
    finished = _finished(links, prepared, reports, skipped, fit_started_at, fit_ended_at)
    if len(links) > 1:
        keep_by_run = {link.run_name: link.config.checkpoint.keep for link in links}
        try:
            prune_checkpoints(head.storage, fit_run, keep_by_run, access)
        except OSError:
            if error is None:
                raise
            # the storage failed the fit too: its error is the one to report; the extra checkpoints stay
    if error is None and len(finished) < len(links):
        missing = links[len(finished)].config.name
        error = RuntimeError(f"run {fit_run}: the fit ended without the final checkpoint of stage {missing}")
    return ChainResult(tuple(finished), error)


def _explain(err: Exception, data: FitData) -> Exception:
    """Why a fit failed: too many corrupt images in a stage's data, said plainly, else the error itself."""
    failure = data.failure()
    if failure is None:
        return err
    failure.__cause__ = err
    return failure


def _stage_input(stage: PreparedStage, payload: WorkerPayload) -> StageInput:
    config = stage.config
    return StageInput(stage.dataset, config.task, config.data, config.seed, payload.train_dataset, payload.val_dataset)


def _prepare_links(links: Sequence[ChainLink], fit_run: str, s3: S3Access | None) -> list[PreparedStage]:
    """Validate each stage in order; one whose parent trains earlier in the fit is checked against that
    parent's spec, and starts from the final checkpoint that parent will write."""
    prepared: list[PreparedStage] = []
    for index, link in enumerate(links):
        if link.parent is None:
            prepared.append(prepare_stage(link.config, prepared[0].access if prepared else s3))
            continue
        if not 0 <= link.parent < index:
            raise ValueError(
                f"run_chain: stage {index} ({link.config.name}) has parent {link.parent}, not an earlier stage"
            )
        parent, parent_link = prepared[link.parent], links[link.parent]
        if storage.normalize(link.config.storage) != storage.normalize(parent.config.storage):
            raise ConfigError(f"stage.storage: a chain's stages share one storage; {link.config.name} differs")
        parent_final = checkpoint_dir_name(owner_prefix(parent_link.run_name, fit_run), parent.total_steps)
        parent_uri = storage.join(storage.normalize(parent.config.storage), fit_run, parent_final)
        config = replace(link.config, model=replace(link.config.model, parent_checkpoint=parent_uri))
        prepared.append(prepare_stage(config, parent.access, parent_spec=parent.spec))
    return prepared


def _payload(link: ChainLink, stage: PreparedStage, index: int, fit_run: str) -> WorkerPayload:
    suffix = "" if index == 0 else f"_{index}"
    return WorkerPayload(
        config=stage.config,
        facts=stage.dataset.card.facts,
        num_train=stage.num_train,
        parent_checkpoint=stage.parent_checkpoint,
        resume_from=link.resume_from,
        s3=stage.access,
        run_name=link.run_name,
        train_dataset=f"train{suffix}",
        val_dataset=f"val{suffix}",
        checkpoint_prefix=owner_prefix(link.run_name, fit_run),
    )


# A fit's reported checkpoints: (checkpoint path, the report's metrics), in report order.
Reports = list[tuple[str, dict[str, Any]]]


def _reports(result: Result) -> Reports:
    return [(checkpoint.path, dict(metrics)) for checkpoint, metrics in result.best_checkpoints or []]


def _reports_after_failure(storage_root: str, fit_run: str, access: S3Access) -> Reports:
    """The reports of a failed chain's fit, read back from the run's storage: which stages finished before the
    failure. Empty when they cannot be read (no checkpoint reported yet, or the storage is what failed the
    fit: then the rerun finds the finished stages again and resumes each from its final checkpoint)."""
    try:
        storage_path, filesystem = _storage_location(storage_root, access)
        return _reports(Result.from_path(storage.join(storage_path, fit_run), storage_filesystem=filesystem))
    except (RuntimeError, OSError, ConfigError):
        return []


def _finished(
    links: Sequence[ChainLink],
    prepared: Sequence[PreparedStage],
    reports: Reports,
    skipped: Sequence[dict[str, int]],
    fit_started_at: float,
    fit_ended_at: float,
) -> list[StageResult]:
    """The stages that reported their final checkpoint, in order, each charged the wall time from its entry
    (the first: from the fit's start) to the next stage's entry (the last: to the fit's end; a stage whose
    child failed before reporting: to its own final report)."""
    by_stage = [_stage_reports(reports, link.run_name) for link in links]
    results: list[StageResult] = []
    for index, (link, stage) in enumerate(zip(links, prepared, strict=True)):
        final = next((r for r in reversed(by_stage[index]) if r[1].get("final")), None)
        if final is None:
            break
        path, metrics = final[0], dict(final[1])
        worker = pop_ledger(metrics)
        started_at = fit_started_at if index == 0 else float(worker["entered_at"])
        if index + 1 == len(links):
            ended_at = fit_ended_at
        elif by_stage[index + 1]:
            ended_at = float(by_stage[index + 1][0][1][f"{LEDGER_PREFIX}entered_at"])
        else:
            ended_at = float(worker["reported_at"])
        metrics.update({f"data/skipped_{split}": count for split, count in skipped[index].items()})
        ledger = StageLedger.measure(worker, started_at, ended_at, stage.config.scaling.num_workers)
        results.append(_stage_result(link, stage, metrics, path, ledger, (started_at, ended_at)))
    return results


def _stage_reports(reports: Reports, run_name: str) -> Reports:
    """The reports of one stage of the fit (its checkpoints name its run), in report order."""
    out = []
    for path, metrics in reports:
        name = parse_checkpoint_dir(PurePosixPath(path).name, PurePosixPath(path).parent.name)
        if name is not None and name.owner == run_name:
            out.append((path, metrics))
    return out


def _stage_result(
    link: ChainLink,
    stage: PreparedStage,
    metrics: dict[str, Any],
    checkpoint_path: str,
    ledger: StageLedger,
    window: tuple[float, float],
) -> StageResult:
    config = stage.config
    cost = StageCost(
        device_kind=config.scaling.device_kind,
        device_model=str(metrics.get("device_model", config.scaling.device_kind)),
        precision=str(metrics.get("precision", "fp32")),
        ledger=ledger,
        train_flops_per_sample=stage.train_flops_per_sample,
        samples=int(metrics.get("samples", 0)),
    )
    return StageResult(
        config.name,
        link.run_name,
        metrics,
        _checkpoint_uri(config.storage, checkpoint_path),
        cost,
        stage.total_steps,
        stage.metric_name,
        stage.head_reinitialized,
        window,
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


def _run_config(
    config: StageConfig,
    run_name: str,
    access: S3Access,
    callbacks: list[UserCallback],
    keep: int | None,
    max_failures: int,
) -> RunConfig:
    storage_path, filesystem = _storage_location(config.storage, access)
    return RunConfig(
        name=run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=keep),
        failure_config=FailureConfig(max_failures=max_failures),
        callbacks=callbacks,
    )


def _storage_location(storage_root: str, access: S3Access) -> tuple[str, pafs.FileSystem | None]:
    """Where Ray Train writes under `storage_root`: a local path (its own filesystem), or a bucket path with
    the S3 filesystem of the driver's access."""
    if not storage.is_remote(storage_root):
        return storage.normalize(storage_root), None
    filesystem, path = storage.filesystem(storage_root, "stage.storage", access)
    return path, filesystem


def _checkpoint_uri(storage_root: str, path: str) -> str:
    if storage.is_remote(storage_root):
        scheme = storage_root.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}"
    return path
