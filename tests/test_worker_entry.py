"""A fit's train function (`stage.worker.entry.train_fit_worker`) asks for the dataset shards of the stage it
starts with while it imports the model stack (torch, timm, `rmoe`), not after, so that their split coordinator
starts meanwhile; and it starts with the right stage after a restart. Run in a fresh interpreter (this one has
the model stack imported), with Ray Train's worker API replaced by a recorder and the model stack by a module
whose import finishes only once the shards were asked for."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ray import cloudpickle
from test_controller_imports import HEAVY, imported_by_unpickling, payload

from rmoe_platform.stage.loop_config import StageOutline, read_outline
from rmoe_platform.stage.payload import from_loop_config, to_loop_config
from rmoe_platform.stage.worker.entry import train_fit_worker

OUTLINE = [
    StageOutline("up-1", 10, ("train", "val")),
    StageOutline("down-2", 4, ("train_1", "val_1")),
    StageOutline("last-3", 6, ("train_2", "val_2")),
]

# Runs `train_fit_worker` on OUTLINE with `latest` (argv[1], "" for none) as Ray's latest checkpoint; prints
# what it asked for and handed over, and which heavy modules were imported. The stand-in for the model stack's
# module waits (up to 10 s) for the shards to be asked for, and says so if they were not.
RUN_ENTRY = textwrap.dedent(
    f"""
    import importlib.abc, importlib.util, json, sys, threading
    import ray.train

    HEAVY = {HEAVY!r}
    LOOP = "rmoe_platform.stage.worker.loop"
    calls, asked = [], threading.Event()

    class Shard:
        def __init__(self, name):
            self._coord_actor = "coordinator-" + name if name.startswith("train") else None

    def get_dataset_shard(name):
        calls.append(["shard", name])
        asked.set()
        return Shard(name)

    class Latest:
        path = sys.argv[1]

    class ModelStack(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name == LOOP else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            if not asked.wait(10):
                calls.append(["the model stack was imported before the shards were asked for"])
            module.train_stages = lambda config, first, restart, starting: calls.append(
                ["train", first, None if restart is None else restart.path, starting]
            )

    ray.train.get_dataset_shard = get_dataset_shard
    ray.train.get_checkpoint = lambda: Latest() if sys.argv[1] else None
    sys.meta_path.insert(0, ModelStack())

    from rmoe_platform.stage.loop_config import StageOutline, pack
    from rmoe_platform.stage.worker.entry import train_fit_worker

    outline = [StageOutline(*stage) for stage in json.loads(sys.argv[2])]
    train_fit_worker(pack(b"", outline))
    print(json.dumps({{"calls": calls, "heavy": [m for m in HEAVY if m in sys.modules]}}))
    """
)


def run_entry(latest: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RUN_ENTRY, latest, json.dumps(OUTLINE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_first_stages_shards_are_asked_for_while_the_model_stack_imports() -> None:
    seen = run_entry("")
    assert seen["calls"] == [
        ["shard", "train"],
        ["shard", "val"],
        ["train", 0, None, ["coordinator-train"]],  # the coordinator it started, waited for at the first batch
    ]
    assert seen["heavy"] == []


@pytest.mark.parametrize(
    ("latest", "first", "resumes"),
    [
        ("/ckpt/up-1/down-2.checkpoint_00000002", 1, True),  # mid-way through the second stage
        ("/ckpt/up-1/down-2.checkpoint_00000004", 2, False),  # the second had finished
    ],
)
def test_a_restarted_fit_asks_for_the_shards_of_the_stage_it_goes_on_with(
    latest: str, first: int, resumes: bool
) -> None:
    train, val = OUTLINE[first].datasets
    seen = run_entry(latest)
    restart = latest if resumes else None
    assert seen["calls"] == [["shard", train], ["shard", val], ["train", first, restart, [f"coordinator-{train}"]]]


def test_a_fit_restarted_after_its_last_stage_finished_trains_nothing() -> None:
    assert run_entry("/ckpt/up-1/last-3.checkpoint_00000006")["calls"] == []


def test_the_loop_config_carries_each_stages_outline(tmp_path: Path) -> None:
    payloads = (payload(tmp_path, "up"), payload(tmp_path, "down"))
    loop_config = pickle.loads(cloudpickle.dumps(to_loop_config(payloads)))
    assert read_outline(loop_config) == [p.outline for p in payloads]
    assert read_outline(loop_config)[0] == StageOutline("up", 4, ("train-up", "val"))
    assert from_loop_config(loop_config) == payloads
    with pytest.raises(TypeError, match="expected stage outlines"):
        read_outline({"payloads": b""})


def test_the_train_function_unpickles_without_importing_the_model_stack() -> None:
    # Ray Train sends it by reference: unpickling imports its module, in the controller and in every worker
    assert imported_by_unpickling(cloudpickle.dumps(train_fit_worker)) == []
