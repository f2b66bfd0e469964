"""The `train_loop_config` a fit hands Ray Train: its stages' payloads as pickled bytes (`stage.payload`), and
beside them each stage's outline in plain values: its run name, its step budget and the names of its datasets.

The outline is what a worker needs before it imports the model stack (torch, timm, `rmoe`: ~2 s on 2 cores):
which stage it starts with (`checkpoint_names.restart_point`) and which dataset shards to ask for, so that
their split coordinator starts while the worker imports (`stage.worker.entry`). This module imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

PAYLOADS_KEY = "payloads"
OUTLINE_KEY = "outline"


class StageOutline(NamedTuple):
    """One stage of a fit in plain values (a worker reads it without unpickling its payload)."""

    run_name: str
    total_steps: int
    datasets: tuple[str, ...]  # its train and val datasets' names in the fit


def pack(payloads: bytes, outline: Sequence[StageOutline]) -> dict[str, Any]:
    """The loop config: pickled payloads and plain outlines (tuples, so nothing to import when unpickled)."""
    return {PAYLOADS_KEY: payloads, OUTLINE_KEY: [tuple(stage) for stage in outline]}


def read_outline(loop_config: dict[str, Any]) -> list[StageOutline]:
    """The stages' outlines, in order; a TypeError for a loop config that does not carry them."""
    raw = loop_config.get(OUTLINE_KEY)
    if not isinstance(raw, list) or not raw:
        raise TypeError(f"train_loop_config: expected stage outlines under {OUTLINE_KEY!r}, got {type(raw).__name__}")
    return [StageOutline(str(run), int(steps), tuple(names)) for run, steps, names in raw]
