"""Training checkpoints that any number of workers can resume from, and any single device can load.

Layout of a checkpoint directory:
- `model.safetensors`: the full single-device model (expert shards gathered) with its `ModelSpec`,
  so `rmoe.load_model(dir / "model.safetensors")` works for inference and export;
- `optimizer.safetensors`: AdamW state by parameter name (expert entries gathered the same way);
- `train_state.json`: step, epoch, samples seen, report history, scheduler state, and the layout that wrote it.
Writing is collective (every rank joins the gathers); rank 0 writes. Loading slices expert tensors for
the loading rank, so a checkpoint written by N workers resumes on M.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from rmoe import ModelSpec
from rmoe.checkpoint import read_metadata, save_state_dict
from rmoe_platform.stage.worker.expert_parallel import ExpertParallelPlan

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


@dataclass
class TrainProgress:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    # the stage's reports so far (thinned), so a resumed stage keeps the curves of its earlier steps
    history: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 1  # runs of the stage so far, this one included (a resumed run is the next attempt)
    # worker seconds per ledger part up to this checkpoint, over every attempt: a resumed stage's cost is
    # the sum over its attempts (what an interrupted attempt did after its last checkpoint is not known)
    spent: dict[str, float] = field(default_factory=dict)


def save_training_checkpoint(
    directory: Path,
    model: nn.Module,
    plan: ExpertParallelPlan,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: TrainProgress,
    spec: ModelSpec,
    metadata: dict[str, str] | None = None,
) -> None:
    """Gather shards and write the checkpoint into `directory` (rank 0 writes; call on every rank).
    `metadata`: extra safetensors metadata of the model file (e.g. the task that rebuilds it)."""
    model_state = plan.full_state_dict(model)
    optim_state = _full_optimizer_state(model, plan, optimizer)
    if plan.dims.rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**(metadata or {}), "step": str(progress.step)}
    save_state_dict(model_state, directory / MODEL_FILE, spec=spec, metadata=meta)
    save_state_dict(optim_state, directory / OPTIMIZER_FILE, spec=None)
    state = {
        "progress": asdict(progress),
        "scheduler": scheduler.state_dict(),  # LambdaLR: plain-function lambdas serialise as None
        "world_size": plan.dims.world_size,
        "expert_parallel_size": plan.dims.ep_size,
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def checkpoint_spec(directory: Path) -> ModelSpec:
    meta = read_metadata(directory / MODEL_FILE)
    if "rmoe_spec" not in meta:
        raise ValueError(f"checkpoint: {directory / MODEL_FILE} carries no rmoe_spec")
    return ModelSpec.from_json(meta["rmoe_spec"])


def load_model_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / MODEL_FILE))


def restore_training_state(
    directory: Path,
    model: nn.Module,
    plan: ExpertParallelPlan,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainProgress:
    """Load optimizer, scheduler and progress into an already parallelized model's trainer."""
    full = load_file(str(directory / OPTIMIZER_FILE))
    for name, param in model.named_parameters():
        entries = {key.split("::", 1)[1]: t for key, t in full.items() if key.startswith(f"{name}::")}
        if not entries or not param.requires_grad:
            continue
        if name in plan.expert_params:
            entries = {k: (plan.shard_experts(t) if t.dim() > 0 else t) for k, t in entries.items()}
        optimizer.state[param] = {k: t.clone().to(param.device) for k, t in entries.items()}
    state = json.loads((directory / STATE_FILE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    return TrainProgress(**state["progress"])


def _full_optimizer_state(
    model: nn.Module, plan: ExpertParallelPlan, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        entries: dict[str, Any] = optimizer.state.get(param, {})
        for key, value in sorted(entries.items()):
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            if name in plan.expert_params and tensor.dim() > 0:
                tensor = plan.gather_experts(tensor)
            out[f"{name}::{key}"] = tensor.detach().cpu()
    return out
