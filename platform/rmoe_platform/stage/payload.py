"""What the driver hands every Train worker of a fit: one typed, frozen value per stage it trains, in order
(through `train_loop_config`), so the worker reads fields, not string keys.

They travel as pickled bytes, not as objects: Ray Train's controller unpickles `train_loop_config` when it
starts, before it starts any worker, and unpickling a `WorkerPayload` imports its classes' modules (torch,
timm, `rmoe`) in a process that never reads them. Measured (2 cores, smoke preset): a controller's import
profile showed 7.1 s under the payload's module, against 4.4 s for the torch that `TorchConfig` needs alone;
with bytes, the second fit's start fell from 12.5 s to 8.7 s (`benchmarks/stage_overhead.py`, one run each).
Bytes are only unpickled where they are read, in the workers.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rmoe_platform.config.stage import StageConfig
from rmoe_platform.datasets.format import DataFacts
from rmoe_platform.stage.loop_config import PAYLOADS_KEY, StageOutline, pack
from rmoe_platform.storage.s3 import S3Access


@dataclass(frozen=True)
class WorkerPayload:
    """The stage's resolved config (classes and input size filled in), its dataset's facts and train rows,
    where to start from (the parent stage's checkpoint, or one of this stage's to resume), the
    driver-resolved S3 access (workers never read credentials from their own environment), the names of its
    datasets in the fit, and what its checkpoint names start with (`stage.checkpoint_names.owner_prefix`)."""

    config: StageConfig
    facts: DataFacts
    num_train: int
    parent_checkpoint: str | None = None
    resume_from: str | None = None
    s3: S3Access = field(default_factory=S3Access)
    run_name: str = ""  # the stage's run (its checkpoints name it)
    train_dataset: str = "train"
    val_dataset: str = "val"
    checkpoint_prefix: str = ""

    @property
    def total_steps(self) -> int:
        return self.config.total_steps(self.num_train)

    @property
    def outline(self) -> StageOutline:
        return StageOutline(self.run_name, self.total_steps, (self.train_dataset, self.val_dataset))


def to_loop_config(payloads: Sequence[WorkerPayload]) -> dict[str, Any]:
    """Ray Train's `train_loop_config` (a mapping) carrying the payloads of the stages a fit trains, in order,
    pickled (see the module's docstring), with their outlines (`stage.loop_config`)."""
    packed = pickle.dumps(tuple(payloads), protocol=pickle.HIGHEST_PROTOCOL)
    return pack(packed, [payload.outline for payload in payloads])


def from_loop_config(loop_config: dict[str, Any]) -> tuple[WorkerPayload, ...]:
    packed = loop_config.get(PAYLOADS_KEY)
    if not isinstance(packed, bytes):
        got = type(packed).__name__
        raise TypeError(f"train_loop_config: expected pickled payloads under {PAYLOADS_KEY!r}, got {got}")
    payloads = pickle.loads(packed)
    if not isinstance(payloads, tuple) or not payloads or not all(isinstance(p, WorkerPayload) for p in payloads):
        got = type(payloads).__name__
        raise TypeError(f"train_loop_config: expected a tuple of WorkerPayload under {PAYLOADS_KEY!r}, got {got}")
    return payloads
