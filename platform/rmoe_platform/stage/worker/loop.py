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
from rmoe_platform.stage.worker.checkpoints import TrainProgress, restore_training_state, save_training_checkpoint
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.stage.worker.expert_parallel import ExpertParallelPlan, parallelize
from rmoe_platform.stage.worker.optim import build_optimizer, build_schedule
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.storage import download
from rmoe_platform.tasks import StageTask, task_for
from rmoe_platform.stage.worker.trainable import apply_trainable

HISTORY_LIMIT = 500  # records of a stage's history in its results row (paper-scale runs stay small)
_NOT_IN_HISTORY = ("history", "final", "world_size", "resumed_from_step")


@dataclass
class WorkerContext:
    config: StageConfig
    total_steps: int
    task: StageTask
    classes: tuple[str, ...]
    model: nn.Module
    spec: ModelSpec
    plan: ExpertParallelPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    rank: int
    world: int
    initial: dict[str, float] = field(default_factory=dict)  # validation before training, if asked


def train_stage_worker(payload: dict[str, Any]) -> None:
    """Build (or resume) the model, parallelize it, train to the budget, evaluate, checkpoint, report."""
    config = StageConfig.from_dict(payload["config"])
    access: S3Access = payload["s3"]
    total_steps = config.total_steps(payload["num_train"])
    # torch marks the autograd-aware collectives deprecated (see expert_parallel); say so once per worker.
    warnings.filterwarnings("once", message="torch.distributed.nn.functional", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        resume_dir = _resume_dir(payload.get("resume_from"), Path(tmp), access)
        ctx = _setup(config, total_steps, payload, resume_dir, access)
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


def _setup(
    config: StageConfig, total_steps: int, payload: dict[str, Any], resume_dir: Path | None, access: S3Access
) -> WorkerContext:
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    task = task_for(config.task)
    parent_uri = payload.get("parent_checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        parent = download(parent_uri, Path(tmp), access) if parent_uri and resume_dir is None else None
        model, spec = task.build(config, payload["image_stats"], parent=parent, resume=resume_dir)
    moe = spec.moe
    apply_trainable(model, config.trainable, freeze_core=moe.freeze_core if moe else True)
    model.to(device)
    plan = parallelize(model, config.scaling.expert_parallel_size)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_schedule(optimizer, config.optim, total_steps)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    classes = tuple(payload["classes"])
    return WorkerContext(
        config, total_steps, task, classes, model, spec, plan, optimizer, scheduler, device, rank, world
    )


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
    return ctx.task.evaluate(ctx.model, batches, ctx.device, ctx.classes)


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
    _record(progress, metrics, final=final)
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


def _record(progress: TrainProgress, metrics: dict[str, Any], *, final: bool) -> None:
    """Append this report to the history (kept in the progress, so checkpoints carry it). Long runs thin
    it to 2x HISTORY_LIMIT whenever it reaches 4x, and to HISTORY_LIMIT at the end: thinning a dense
    history once at the end keeps the spacing even, where thinning often to the final size would not."""
    record = {k: v for k, v in metrics.items() if k not in _NOT_IN_HISTORY and not k.startswith("initial/")}
    progress.history.append(record)
    if final:
        progress.history = thin_history(progress.history, HISTORY_LIMIT)
    elif len(progress.history) > 4 * HISTORY_LIMIT:
        progress.history = thin_history(progress.history, 2 * HISTORY_LIMIT)


def thin_history(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` records spread evenly over steps, first and last kept. Evaluated records (val_*)
    and the others are thinned apart (evaluated ones get up to half) so val curves keep their points;
    choosing by step, not by index, keeps a re-thinned history even."""
    if len(records) <= limit:
        return list(records)
    evaluated = [i for i, r in enumerate(records) if any(k.startswith("val_") for k in r)]
    others = [i for i, r in enumerate(records) if not any(k.startswith("val_") for k in r)]
    eval_budget = min(len(evaluated), limit // 2)
    keep = _evenly_by_step(records, evaluated, eval_budget) + _evenly_by_step(records, others, limit - eval_budget)
    return [records[i] for i in sorted(set(keep))]


def _evenly_by_step(records: list[dict[str, Any]], indices: list[int], count: int) -> list[int]:
    """Of `indices` (ascending steps), the ones nearest to `count` evenly spaced steps, ends included."""
    if len(indices) <= count:
        return list(indices)
    if count <= 1:
        return indices[-count:] if count else []
    steps = [float(records[i].get("step", i)) for i in indices]
    chosen, j = [], 0
    for t in range(count):
        target = steps[0] + (steps[-1] - steps[0]) * t / (count - 1)
        while j + 1 < len(steps) and abs(steps[j + 1] - target) <= abs(steps[j] - target):
            j += 1
        chosen.append(indices[j])
    return chosen


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
