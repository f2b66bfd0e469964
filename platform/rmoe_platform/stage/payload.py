"""What the driver hands every Train worker of a stage: one typed, frozen value (Ray pickles it into each
worker through `train_loop_config`), so the worker reads fields, not string keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rmoe_platform.config.stage import StageConfig
from rmoe_platform.datasets.format import DataFacts
from rmoe_platform.storage.s3 import S3Access

_KEY = "payload"


@dataclass(frozen=True)
class WorkerPayload:
    """The stage's resolved config (classes and input size filled in), its dataset's facts and train rows,
    where to start from (the parent stage's checkpoint, or one of this stage's to resume), and the
    driver-resolved S3 access (workers never read credentials from their own environment)."""

    config: StageConfig
    facts: DataFacts
    num_train: int
    parent_checkpoint: str | None = None
    resume_from: str | None = None
    s3: S3Access = field(default_factory=S3Access)

    @property
    def total_steps(self) -> int:
        return self.config.total_steps(self.num_train)

    def to_loop_config(self) -> dict[str, Any]:
        """Ray Train's `train_loop_config` (a mapping) carrying this payload."""
        return {_KEY: self}

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> WorkerPayload:
        payload = loop_config.get(_KEY)
        if not isinstance(payload, cls):
            got = type(payload).__name__
            raise TypeError(f"train_loop_config: expected a {cls.__name__} under {_KEY!r}, got {got}")
        return payload
