"""The train function Ray Train runs in every worker of a fit, `train_fit_worker`, in a module that imports
neither torch, timm nor `rmoe`.

A worker asks for its first stage's dataset shards while it imports the model stack (torch, timm, `rmoe`:
~2 s on 2 cores), not after: the request waits for Ray Train's dataset manager (an actor that may still be
starting), and the split coordinator it starts (a process of its own, 1.1-1.8 s of CPU) comes up meanwhile.
Measured on the smoke preset's first stage (`benchmarks/stage_overhead.py`): asking before the import, 10.1-10.4 s
of overhead; asking while it runs, 9.1-9.3 s. `stage.worker.loop` then trains the stages.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any

import ray.train

from rmoe_platform.stage.checkpoint_names import restart_point
from rmoe_platform.stage.loop_config import read_outline

_LOOP_MODULE = "rmoe_platform.stage.worker.loop"  # the stages' training: torch, timm, `rmoe`


def train_fit_worker(loop_config: dict[str, Any]) -> None:
    """Train each stage of the fit in turn. After a worker failure Ray restarts this function with the fit's
    latest checkpoint: the stages before the one that wrote it are done, and so is that one if it was its
    final checkpoint."""
    outline = read_outline(loop_config)
    latest = ray.train.get_checkpoint()
    first, resume_first = restart_point(
        [(stage.run_name, stage.total_steps) for stage in outline], latest.path if latest is not None else None
    )
    if first == len(outline):
        return
    # The model stack imports on a thread of its own while this one waits for Ray Train's dataset manager (an
    # actor that may still be starting) to hand out the shards; an import error surfaces in the import below.
    importer = threading.Thread(target=importlib.import_module, args=(_LOOP_MODULE,), name="import-model-stack")
    importer.start()
    starting = open_dataset_shards(outline[first].datasets)
    importer.join()
    from rmoe_platform.stage.worker.loop import train_stages

    train_stages(loop_config, first, latest if resume_first else None, starting)


def open_dataset_shards(names: Sequence[str]) -> list[Any]:
    """Ask for a stage's dataset shards; returns the split coordinators this started. A split dataset's shards
    come from a coordinator actor Ray starts when they are first asked for; Ray Train caches the shards, so
    the stage gets these back when it asks again."""
    coordinators = []
    for name in names:
        actor = getattr(ray.train.get_dataset_shard(name), "_coord_actor", None)  # None: an unsplit dataset
        if actor is not None:
            coordinators.append(actor)
    return coordinators
