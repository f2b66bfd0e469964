"""How a stage's checkpoint directories are named, and how a name is read back: one source for the worker
that writes them, the driver that predicts a chained parent's final checkpoint, and the resume scan.

A fit that trains one stage writes `<run>/checkpoint_<step>` (the run is the stage's). A fit that trains a
chain of stages (a pipeline's consecutive stages on one worker group, `stage.run.run_chain`) is named after
its first stage, which keeps the plain names; every later stage's checkpoints carry that stage's own run
name: `<chain run>/<stage run>.checkpoint_<step>`. So each checkpoint names the run (and so the stage) it
belongs to, wherever it lies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import NamedTuple

CHECKPOINT_PREFIX = "checkpoint_"
_OWNER_SEPARATOR = "."


class CheckpointName(NamedTuple):
    owner: str  # the run name of the stage the checkpoint belongs to
    step: int


def owner_prefix(stage_run: str, fit_run: str) -> str:
    """What a stage's checkpoint names start with before `checkpoint_`: nothing for the fit's own stage."""
    return "" if stage_run == fit_run else f"{stage_run}{_OWNER_SEPARATOR}"


def checkpoint_dir_name(prefix: str, step: int) -> str:
    """The directory name of a checkpoint at `step`, `prefix` from `owner_prefix`."""
    return f"{prefix}{CHECKPOINT_PREFIX}{step:08d}"


def parse_checkpoint_dir(name: str, run_dir: str) -> CheckpointName | None:
    """Whose checkpoint a directory named `name` in the run directory `run_dir` is, and at which step; None
    for anything else."""
    owner, separator, rest = name.rpartition(_OWNER_SEPARATOR)
    if not separator:
        owner, rest = run_dir, name
    digits = rest.removeprefix(CHECKPOINT_PREFIX)
    if not rest.startswith(CHECKPOINT_PREFIX) or not digits.isdigit() or not owner:
        return None
    return CheckpointName(owner, int(digits))


def restart_point(stages: Sequence[tuple[str, int]], latest: str | None) -> tuple[int, bool]:
    """Where a fit's train function starts when Ray restarts it after a worker failure, from its latest
    reported checkpoint (`latest`, a path; None on the first attempt) and its stages as (run name, total
    steps) in order: (the stage to start with, whether it resumes from `latest`). The stages before the one
    that wrote `latest` are done, and so is that one if `latest` is its final checkpoint."""
    if latest is None:
        return 0, False
    path = PurePosixPath(latest)
    name = parse_checkpoint_dir(path.name, path.parent.name)
    for index, (run_name, total_steps) in enumerate(stages):
        if name is not None and name.owner == run_name:
            return (index + 1, False) if name.step >= total_steps else (index, True)
    raise RuntimeError(f"the fit's latest checkpoint {latest!r} belongs to none of its stages")
