"""What Ray Train's controller unpickles when a fit starts (before it starts any worker) must not import
torch, timm or `rmoe`: seconds of every fit's start on 2 cores. The stages' payloads travel as bytes that
only the workers unpickle, and a sweep trial's callback lives in a module of its own."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from ray import cloudpickle

from rmoe_platform.config.stage import StageConfig
from rmoe_platform.datasets.format import DataFacts
from rmoe_platform.stage.payload import WorkerPayload, from_loop_config, to_loop_config
from rmoe_platform.sweep.reporting import EvaluationReporter

HEAVY = ("torch", "timm", "rmoe")
# A fresh interpreter that unpickles stdin as the controller would, then names the heavy modules it imported.
UNPICKLE = (
    "import json, pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
    f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
)


def imported_by_unpickling(blob: bytes) -> list[str]:
    out = subprocess.run([sys.executable, "-c", UNPICKLE], input=blob, capture_output=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def payload(tmp_path: Path, name: str) -> WorkerPayload:
    config = StageConfig.from_dict(
        {
            "name": name,
            "storage": str(tmp_path / "runs"),
            "model": {"arch": "rmoe_vit_nano_patch4_32"},
            "budget": {"steps": 4},
            "data": {"uri": str(tmp_path / "data")},
        }
    )
    facts = DataFacts(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=("a", "b"))
    return WorkerPayload(config=config, facts=facts, num_train=64, run_name=name, train_dataset=f"train-{name}")


def test_the_loop_config_unpickles_without_importing_the_model_stack(tmp_path: Path) -> None:
    payloads = (payload(tmp_path, "up"), payload(tmp_path, "down"))
    loop_config = to_loop_config(payloads)
    assert imported_by_unpickling(cloudpickle.dumps(loop_config)) == []
    # the workers get the same payloads back, in order
    assert from_loop_config(pickle.loads(cloudpickle.dumps(loop_config))) == payloads


def test_a_loop_config_without_pickled_payloads_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected pickled payloads"):
        from_loop_config({"payloads": (payload(tmp_path, "up"),)})
    with pytest.raises(TypeError, match="expected a tuple of WorkerPayload"):
        from_loop_config({"payloads": pickle.dumps(("not a payload",))})


def test_a_sweep_trials_callback_unpickles_without_importing_the_model_stack() -> None:
    # its class, by reference, as in the pickled callback (an instance needs a Tune session to be made)
    assert imported_by_unpickling(cloudpickle.dumps(EvaluationReporter)) == []
