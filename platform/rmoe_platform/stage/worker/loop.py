"""The per-worker training function of a stage (Ray Train V2 `train_loop_per_worker`)."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch import nn

import rmoe
from rmoe import ModelSpec
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.stage.payload import WorkerPayload
from rmoe_platform.stage.worker.checkpoints import TrainProgress, restore_training_state, save_training_checkpoint
from rmoe_platform.stage.worker.expert_parallel import ExpertParallelPlan, parallelize
from rmoe_platform.stage.worker.history import record_history
from rmoe_platform.stage.worker.optim import build_optimizer, build_schedule
from rmoe_platform.stage.worker.trainable import apply_trainable
from rmoe_platform.storage import download
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.tasks import StageTask, task_for


@dataclass
class WorkerContext:
    config: StageConfig
    total_steps: int
    task: StageTask
    model: nn.Module
    spec: ModelSpec
    plan: ExpertParallelPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    rank: int
    world: int
    initial: dict[str, float] = field(default_factory=dict)  # validation before training, if asked


def train_stage_worker(loop_config: dict[str, Any]) -> None:
    """Build (or resume) the model, parallelize it, train to the budget, evaluate, checkpoint, report."""
    payload = WorkerPayload.from_loop_config(loop_config)
    config, access, total_steps = payload.config, payload.s3, payload.total_steps
    # torch marks the autograd-aware collectives deprecated (see expert_parallel); say so once per worker.
    warnings.filterwarnings("once", message="torch.distributed.nn.functional", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        resume_dir = _resume_dir(payload.resume_from, Path(tmp), access)
        ctx = _setup(payload, resume_dir)
        progress, resumed_from = _resume(ctx, resume_dir)
    train_shard = ray.train.get_dataset_shard("train")
    started = time.perf_counter()
    last: dict[str, float] = {}
    if config.evaluate_at_start and progress.step == 0:
        ctx.initial = {f"initial/{name}": value for name, value in validate(ctx).items()}
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
        )
        for batch in batches:
            if progress.step >= total_steps:
                break
            _maybe_inject_fault(config, ctx.rank, progress.step)
            last = _train_step(ctx, batch)
            progress.step += 1
            progress.samples += config.batch_size
            if _checkpoint_due(config, progress.step, total_steps):
                _report(ctx, progress, last, resumed_from, started, checkpoint=True)
            elif progress.step % config.log_every == 0:
                _report(ctx, progress, last, resumed_from, started, checkpoint=False)
        else:
            if progress.step == epoch_start_step:
                raise RuntimeError(
                    f"worker {ctx.rank}: an epoch gave no full batch of {config.local_batch_size} rows "
                    "(too few decodable train rows for batch_size and num_workers)"
                )
            progress.epoch += 1
            if _epoch_checkpoint_due(config, progress.epoch) and progress.step < total_steps:
                _report(ctx, progress, last, resumed_from, started, checkpoint=True, evaluate=True)
    _report(ctx, progress, last, resumed_from, started, checkpoint=True, evaluate=True, final=True)


def _resume_dir(resume_uri: str | None, tmp: Path, access: S3Access) -> Path | None:
    """Where to resume from: Ray's latest checkpoint of this run (after a worker failure), else the
    checkpoint the caller named (possibly written by a different number of workers), else nowhere."""
    latest = ray.train.get_checkpoint()
    if latest is not None:
        return Path(latest.to_directory(str(tmp / "latest")))
    if resume_uri is not None:
        return download(resume_uri, tmp, access)
    return None


def _setup(payload: WorkerPayload, resume_dir: Path | None) -> WorkerContext:
    config, total_steps = payload.config, payload.total_steps
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    task = task_for(config.task, payload.facts)
    parent_uri = payload.parent_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        parent = download(parent_uri, Path(tmp), payload.s3) if parent_uri and resume_dir is None else None
        model, spec = task.build(config, parent=parent, resume=resume_dir)
    moe = spec.moe
    apply_trainable(model, config.trainable, freeze_core=moe.freeze_core if moe else True)
    model.to(device)
    plan = parallelize(model, config.scaling.expert_parallel_size)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_schedule(optimizer, config.optim, total_steps)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return WorkerContext(config, total_steps, task, model, spec, plan, optimizer, scheduler, device, rank, world)


def _resume(ctx: WorkerContext, resume_dir: Path | None) -> tuple[TrainProgress, int | None]:
    if resume_dir is None:
        return TrainProgress(), None
    progress = restore_training_state(resume_dir, ctx.model, ctx.plan, ctx.optimizer, ctx.scheduler)
    return progress, progress.step


def _train_step(ctx: WorkerContext, batch: Any) -> dict[str, float]:
    ctx.model.train()
    out = ctx.task.step(ctx.model, batch, ctx.device)
    loss = out.task_loss + out.aux.loss
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.plan.sync_gradients()
    grad_norm = ctx.plan.clip_grad_norm_(ctx.config.optim.grad_clip or float("inf"))
    ctx.optimizer.step()
    ctx.scheduler.step()
    stats = torch.stack([loss.detach(), out.task_loss.detach(), out.aux.loss.detach().reshape(())]).to(torch.float32)
    if ctx.world > 1:
        dist.all_reduce(stats)
        stats /= ctx.world
    metrics = {"loss": float(stats[0]), "task_loss": float(stats[1]), "aux_loss": float(stats[2])}
    metrics.update(out.components)
    metrics["lr"] = ctx.scheduler.get_last_lr()[0]
    metrics["grad_norm"] = grad_norm
    metrics.update({f"moe/{k}": v for k, v in out.aux.telemetry().items()})
    return metrics


def validate(ctx: WorkerContext) -> dict[str, float]:
    """The task's validation metrics over this worker's (unshuffled) shard, combined over workers."""
    ctx.model.eval()
    batches = ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=ctx.config.local_batch_size, collate_fn=ctx.task.collate_fn("val")
    )
    return ctx.task.evaluate(ctx.model, batches, ctx.device)


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
    last: dict[str, float],
    resumed_from: int | None,
    started: float,
    *,
    checkpoint: bool,
    evaluate: bool = False,
    final: bool = False,
) -> None:
    """Every worker reports (a Ray Train sync point); rank 0 attaches the checkpoint."""
    metrics: dict[str, Any] = {**ctx.initial, **last}
    metrics.update({"step": progress.step, "epoch": progress.epoch, "samples": progress.samples})
    metrics.update(
        {"resumed_from_step": -1 if resumed_from is None else resumed_from, "final": final, "world_size": ctx.world}
    )
    metrics["train_seconds"] = time.perf_counter() - started
    if evaluate:
        metrics.update(validate(ctx))
    metrics.update(residual_telemetry(ctx))
    record_history(progress, metrics, final=final)
    if final:
        metrics["history"] = progress.history
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
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
        ray.train.report(metrics, checkpoint=attached, checkpoint_dir_name=f"checkpoint_{progress.step:08d}")


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
