"""The per-worker training function of a fit (Ray Train V2 `train_loop_per_worker`): the stages it was handed,
in order, on one worker group (a chain's later stages build on the checkpoint the earlier one reported)."""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch import nn

import rmoe
from rmoe import ModelSpec
from rmoe.telemetry import MoEAuxSummary
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.cost.devices import identify
from rmoe_platform.cost.ledger import LapClock
from rmoe_platform.stage.checkpoint_names import checkpoint_dir_name
from rmoe_platform.stage.payload import WorkerPayload, from_loop_config
from rmoe_platform.stage.worker import collectives
from rmoe_platform.stage.worker.checkpoints import TrainProgress, restore_training_state, save_training_checkpoint
from rmoe_platform.stage.worker.compile import compile_dense_parts
from rmoe_platform.stage.worker.entry import open_dataset_shards
from rmoe_platform.stage.worker.expert_parallel import ExpertParallelPlan, parallelize
from rmoe_platform.stage.worker.history import record_history
from rmoe_platform.stage.worker.optim import build_optimizer, build_schedule
from rmoe_platform.stage.worker.precision import Precision
from rmoe_platform.stage.worker.trainable import apply_trainable
from rmoe_platform.storage import download
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.tasks import StageTask, task_for
from rmoe_platform.tasks.base import PREDICTIONS_DIR


@dataclass
class IngestWait:
    """Charges the wait for an epoch's or a validation's first batch (Ray Data starting its pipeline) to
    `ingest_start`; at the stage's first such batch also the wait for its split coordinators that are still
    starting (`starting`), so that no training or evaluation is timed while they start."""

    clock: LapClock
    starting: list[Any] = field(default_factory=list)  # coordinator actors not yet known to be up

    def first_batch_arrived(self) -> None:
        if self.starting:
            ray.get([actor.__ray_ready__.remote() for actor in self.starting])
            self.starting = []
        self.clock.lap("ingest_start")


@dataclass
class WorkerContext:
    config: StageConfig
    total_steps: int
    task: StageTask
    model: nn.Module  # the single-device model (expert shards in place); `plan.module` is what a step calls
    spec: ModelSpec
    plan: ExpertParallelPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler | None
    rank: int
    world: int
    payload: WorkerPayload
    ingest: IngestWait
    initial: dict[str, float] = field(default_factory=dict)  # validation before training, if asked

    @property
    def clock(self) -> LapClock:
        """Where this worker's time goes (the stage's cost ledger)."""
        return self.ingest.clock


@dataclass
class StepStats:
    """One step's numbers, left on the device: they are read (and averaged over workers) only when reported,
    so the training loop never waits for the device."""

    losses: torch.Tensor  # [loss, task_loss, aux_loss], float32
    grad_norm: torch.Tensor
    components: dict[str, torch.Tensor]
    aux: MoEAuxSummary


def train_stages(
    loop_config: dict[str, Any], first: int, restart: ray.train.Checkpoint | None, starting: list[Any]
) -> None:
    """Train the fit's stages from `first` on (`entry.train_fit_worker`), the first resuming from `restart` if
    given. `starting`: the split coordinators the first stage's shards started; each later stage asks for its
    own shards as it starts, so that their coordinator comes up while it builds its model."""
    payloads = from_loop_config(loop_config)
    # torch marks the autograd-aware collectives deprecated (see expert_parallel); say so once per worker.
    warnings.filterwarnings("once", message="torch.distributed.nn.functional", category=FutureWarning)
    for index in range(first, len(payloads)):
        payload = payloads[index]
        if index > first:
            starting = open_dataset_shards(payload.outline.datasets)
        train_one_stage(payload, restart if index == first else None, starting)
        _release_stage_memory()  # the next stage builds its own model and optimizer
        collectives.barrier()  # rank 0 has persisted the final checkpoint the next stage starts from


def _release_stage_memory() -> None:
    """Free what a finished stage held (its model, optimizer and DDP buckets are unreachable by now, some in
    reference cycles) and hand cached device blocks back, so the next stage of the fit has the device's memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_one_stage(
    payload: WorkerPayload, restart: ray.train.Checkpoint | None, starting_coordinators: list[Any]
) -> None:
    """Build (or resume) the model, parallelize it, train to the budget, evaluate, checkpoint, report.
    `starting_coordinators`: the stage's split coordinators, maybe still starting (waited for at its first batch)."""
    clock = LapClock()
    config, access, total_steps = payload.config, payload.s3, payload.total_steps
    with tempfile.TemporaryDirectory() as tmp:
        resume_dir = _resume_dir(restart, payload.resume_from, Path(tmp), access)
        ctx = _setup(payload, resume_dir, IngestWait(clock, starting_coordinators))
        progress, resumed_from = _resume(ctx, resume_dir)
    train_shard = ray.train.get_dataset_shard(payload.train_dataset)
    clock.lap("setup")
    last: StepStats | None = None
    if config.evaluate_at_start and progress.step == 0:
        ctx.initial = {f"initial/{name}": value for name, value in validate(ctx).items()}
        _settle(ctx)
        clock.lap("eval")
    shuffle_buffer = config.data.shuffle_buffer
    if shuffle_buffer is None:
        shuffle_buffer = 8 * config.local_batch_size
    while progress.step < total_steps:
        epoch_start_step = progress.step
        batches = train_shard.iter_torch_batches(
            batch_size=config.local_batch_size,
            drop_last=True,
            collate_fn=ctx.task.collate_fn("train"),
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=config.seed * 100_003 + progress.epoch if shuffle_buffer else None,
            pin_memory=ctx.device.type == "cuda",
        )
        clock.lap("train")
        for batch in _lap_first_batch(batches, ctx.ingest):
            if progress.step >= total_steps:
                break
            _maybe_inject_fault(config, ctx.rank, progress.step)
            last = _train_step(ctx, batch)
            progress.step += 1
            progress.samples += config.batch_size
            if _checkpoint_due(config, progress.step, total_steps):
                _report(ctx, progress, last, resumed_from, checkpoint=True)
            elif progress.step % config.log_every == 0:
                _report(ctx, progress, last, resumed_from, checkpoint=False)
        else:
            if progress.step == epoch_start_step:
                raise RuntimeError(
                    f"worker {ctx.rank}: an epoch gave no full batch of {config.local_batch_size} rows "
                    "(too few decodable train rows for batch_size and num_workers)"
                )
            progress.epoch += 1
            if _epoch_checkpoint_due(config, progress.epoch) and progress.step < total_steps:
                _report(ctx, progress, last, resumed_from, checkpoint=True, evaluate=True)
    _report(ctx, progress, last, resumed_from, checkpoint=True, evaluate=True, final=True)


def _resume_dir(
    restart: ray.train.Checkpoint | None, resume_uri: str | None, tmp: Path, access: S3Access
) -> Path | None:
    """Where to resume from: Ray's latest checkpoint of this stage (after a worker failure), else the
    checkpoint the caller named (possibly written by a different number of workers), else nowhere."""
    if restart is not None:
        return Path(restart.to_directory(str(tmp / "latest")))
    if resume_uri is not None:
        return download(resume_uri, tmp, access)
    return None


def _setup(payload: WorkerPayload, resume_dir: Path | None, ingest: IngestWait) -> WorkerContext:
    config, total_steps = payload.config, payload.total_steps
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    precision = Precision.of(config.precision, device)
    task = task_for(config.task, payload.facts)
    parent_uri = payload.parent_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        parent = download(parent_uri, Path(tmp), payload.s3) if parent_uri and resume_dir is None else None
        model, spec = task.build(config, parent=parent, resume=resume_dir)
    moe = spec.moe
    apply_trainable(model, config.trainable, freeze_core=moe.freeze_core if moe else True)
    model.to(device)
    task.prepare_for_device(model, device)
    if config.compile:
        compile_dense_parts(model)
    plan = parallelize(model, config.scaling.expert_parallel_size, find_unused_parameters=task.may_skip_parameters)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_schedule(optimizer, config.optim, total_steps, config.milestone_steps(payload.num_train))
    return WorkerContext(
        config,
        total_steps,
        task,
        model,
        spec,
        plan,
        optimizer,
        scheduler,
        device,
        precision,
        precision.grad_scaler(),
        collectives.rank(),
        collectives.world_size(),
        payload,
        ingest,
    )


def _resume(ctx: WorkerContext, resume_dir: Path | None) -> tuple[TrainProgress, int | None]:
    if resume_dir is None:
        return TrainProgress(), None
    progress = restore_training_state(resume_dir, ctx.model, ctx.plan, ctx.optimizer, ctx.scheduler)
    progress.attempts += 1
    ctx.clock.carry(progress.spent)
    return progress, progress.step


def _train_step(ctx: WorkerContext, batch: Any) -> StepStats:
    """Forward under the stage's autocast, backward (DDP syncs the replicated gradients as it goes), expert
    gradients, clipping by the global norm, optimizer and schedule: no host sync."""
    ctx.model.train()
    with ctx.precision.autocast():
        out = ctx.task.step(ctx.model, batch, ctx.device, call=ctx.plan.module)
        loss = out.task_loss + out.aux.loss
    ctx.optimizer.zero_grad(set_to_none=True)
    (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
    ctx.plan.sync_expert_gradients()
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    grad_norm = ctx.plan.clip_grad_norm_(ctx.config.optim.grad_clip or float("inf"))
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)  # skipped (on every worker) when a gradient overflowed
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    losses = torch.stack([loss.detach(), out.task_loss.detach(), out.aux.loss.detach().reshape(())]).float()
    return StepStats(losses, grad_norm.detach(), out.components, out.aux)


def _step_metrics(ctx: WorkerContext, last: StepStats | None) -> dict[str, float]:
    """The latest step's numbers as floats, its losses averaged over the workers (a collective: every
    worker reports together)."""
    if last is None:
        return {}
    losses = collectives.all_reduce(last.losses, op="avg").tolist()
    metrics = {"loss": losses[0], "task_loss": losses[1], "aux_loss": losses[2]}
    metrics.update({name: float(value) for name, value in last.components.items()})
    metrics["lr"] = ctx.scheduler.get_last_lr()[0]
    metrics["grad_norm"] = float(last.grad_norm)
    metrics.update({f"moe/{k}": v for k, v in last.aux.telemetry().items()})
    return metrics


def validate(ctx: WorkerContext, export: Path | None = None) -> dict[str, float]:
    """The task's validation metrics over this worker's (unshuffled) shard, combined over workers;
    `export`: where the task writes its predictions (if it exports any)."""
    ctx.model.eval()
    batches = ray.train.get_dataset_shard(ctx.payload.val_dataset).iter_torch_batches(
        batch_size=ctx.config.local_batch_size,
        collate_fn=ctx.task.collate_fn("val"),
        pin_memory=ctx.device.type == "cuda",
    )
    with ctx.precision.autocast():
        return ctx.task.evaluate(ctx.model, _lap_first_batch(batches, ctx.ingest), ctx.device, export=export)


def _lap_first_batch(batches: Iterable[Any], ingest: IngestWait) -> Iterator[Any]:
    """`batches`, with the wait for the first one (Ray Data starting the split's pipeline) given to
    `ingest_start`, as for a training epoch: overhead, not the evaluation's compute."""
    iterator = iter(batches)
    first = next(iterator, None)
    ingest.first_batch_arrived()
    if first is None:
        return
    yield first
    yield from iterator


def residual_telemetry(ctx: WorkerContext) -> dict[str, float]:
    """Mean and max ‖θʳₑ‖/‖θ⁰‖ per residual MoE layer, over all experts (gathered across shards)."""
    out: dict[str, float] = {}
    for name, ratios in rmoe.residual_norm_ratios(ctx.model).items():
        full = ctx.plan.gather_experts(torch.tensor(ratios))
        out[f"moe/{name}/residual_norm_ratio_mean"] = float(full.mean())
        out[f"moe/{name}/residual_norm_ratio_max"] = float(full.max())
    return out


def _report(
    ctx: WorkerContext,
    progress: TrainProgress,
    last: StepStats | None,
    resumed_from: int | None,
    *,
    checkpoint: bool,
    evaluate: bool = False,
    final: bool = False,
) -> None:
    """Every worker reports (a Ray Train sync point); rank 0 attaches the checkpoint. The final validation
    writes its predictions into the final checkpoint (`PREDICTIONS_DIR`), for the tasks that export them.
    The time since the last lap was training; a plain report counts as training too (the loop's logging),
    validation as eval, writing and reporting a checkpoint as checkpoint."""
    _settle(ctx)
    ctx.clock.lap("train")
    metrics: dict[str, Any] = {**ctx.initial, **_step_metrics(ctx, last)}
    metrics.update({"step": progress.step, "epoch": progress.epoch, "samples": progress.samples})
    metrics.update(
        {
            "resumed_from_step": -1 if resumed_from is None else resumed_from,
            "attempts": progress.attempts,
            "final": final,
            "world_size": ctx.world,
        }
    )
    metrics["precision"] = ctx.precision.name
    metrics["device_model"] = device_model(ctx.device)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if evaluate:
            metrics.update(validate(ctx, export=directory / PREDICTIONS_DIR if final else None))
            _settle(ctx)
            ctx.clock.lap("eval")
        metrics.update(residual_telemetry(ctx))
        record_history(progress, metrics, final=final)
        if final:
            metrics["history"] = progress.history
        if not checkpoint:
            ray.train.report({**metrics, **ctx.clock.report()})
            ctx.clock.lap("train")
            return
        progress.spent = dict(ctx.clock.seconds)
        save_training_checkpoint(
            directory,
            ctx.model,
            ctx.plan,
            ctx.optimizer,
            ctx.scheduler,
            progress,
            ctx.spec,
            metadata=ctx.task.checkpoint_metadata(ctx.config),
        )
        attached = ray.train.Checkpoint.from_directory(tmp) if ctx.rank == 0 else None
        ctx.clock.lap("checkpoint")
        # the final report's upload lands in the driver's teardown: this worker's part ends as it starts
        metrics.update(ctx.clock.report())
        name = checkpoint_dir_name(ctx.payload.checkpoint_prefix, progress.step)
        ray.train.report(metrics, checkpoint=attached, checkpoint_dir_name=name)
        ctx.clock.lap("checkpoint")


def _settle(ctx: WorkerContext) -> None:
    """Wait for the device's queued work, so it is charged to the part that queued it (report points only,
    never inside the training steps)."""
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def device_model(device: torch.device) -> str:
    """The device table's key of `device` ("cpu", "h100", …), else torch's name of it."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return identify(name) or name


def _checkpoint_due(config: StageConfig, step: int, total_steps: int) -> bool:
    every = config.checkpoint.every_n_steps
    return every is not None and step % every == 0 and step < total_steps


def _epoch_checkpoint_due(config: StageConfig, epoch: int) -> bool:
    every = config.checkpoint.every_n_epochs
    return every is not None and epoch % every == 0


def _maybe_inject_fault(config: StageConfig, rank: int, step: int) -> None:
    """Test-only hook: the configured worker dies at the configured step, once."""
    fault = config.fault_injection
    if fault is None or rank != fault.rank or step != fault.step:
        return
    marker = Path(fault.marker)
    if marker.exists():
        return
    marker.write_text(f"worker {rank} exited at step {step}\n")
    os._exit(17)
