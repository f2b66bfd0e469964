"""Mixed precision of a stage's training step: the autocast context and, for fp16, the gradient scaler.

Master weights stay fp32 (the model is never cast), so optimizer states and checkpoints are fp32 too; the
router computes in fp32 under any autocast (`rmoe.moe.routing`). `auto` is bf16 on CUDA devices that
support it and fp32 elsewhere (CPU bf16 autocast works, and is how the CPU tests exercise the path, but
it is slower than fp32 on most CPUs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from rmoe_platform.stage.worker import collectives

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(requested: str, device: torch.device) -> str:
    """`bf16`, `fp16` or `fp32`: what `requested` (one of `config.stage.PRECISIONS`) means on `device`."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a stage on its device."""

    name: str  # bf16 | fp16 | fp32
    device: torch.device

    @classmethod
    def of(cls, requested: str, device: torch.device) -> Precision:
        return cls(resolve_precision(requested, device), device)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Forward passes (training and evaluation) run inside this."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler (None otherwise). With several workers each holds different expert shards, so
        an overflow one of them finds must skip the step on all: torch's `ShardedGradScaler` all-reduces the
        found-inf flags (over the world group) before stepping."""
        if self.name != "fp16":
            return None
        if collectives.world_size() > 1:
            return ShardedGradScaler(device=self.device.type)
        return torch.amp.GradScaler(self.device.type)
