"""The first half of `benchmarks/device_check.sh`: one stage of each task through Ray Train on one GPU.

A 1-worker Ray Train stage (NCCL process group, bf16 autocast) of classification, segmentation (UperNet)
and detection (Mask R-CNN), each with MoE layers, on generated data: a few steps, then validation. Prints,
per stage, the precision it ran in, the first and last training loss, the validation metric and the wall
time; exits 1 if a stage fails or a loss is not finite, and without a CUDA device.

    .venv/bin/python benchmarks/gpu_stages.py [--steps 12]
    .venv/bin/python benchmarks/gpu_stages.py --cpu --steps 2    # the same stages on CPU workers (bf16
                                                                 # autocast): a dry run of this script
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rmoe_platform.cluster import start_local
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.stage.run import run_stage

SWIN = "rmoe_swin_nano_patch4_window4_64"
TASKS: dict[str, dict[str, Any]] = {
    "classification": {
        "model": {"arch": "rmoe_vit_nano_patch4_32", "moe": {"num_experts": 4, "top_k": 2}},
        "generate": {"task": "classification", "num_train": 1024, "num_val": 256, "num_classes": 10},
    },
    "segmentation": {
        "model": {"arch": SWIN, "moe": {"num_experts": 4, "top_k": 1}},
        "head": {"channels": 64},
        "generate": {"task": "segmentation", "num_train": 512, "num_val": 64, "img_size": 64, "num_classes": 6},
    },
    "detection": {
        "model": {"arch": SWIN, "moe": {"num_experts": 4, "top_k": 1}},
        "head": {"channels": 64, "fc_channels": 256, "anchor_scales": [2, 4], "rpn_proposals": 200},
        "generate": {"task": "detection", "num_train": 512, "num_val": 64, "img_size": 64, "num_classes": 6},
    },
}


def stage_config(task: str, root: Path, steps: int, use_gpu: bool) -> StageConfig:
    spec = TASKS[task]
    return StageConfig.from_dict(
        {
            "name": f"gpu-{task}",
            "task": task,
            "model": spec["model"],
            "head": spec.get("head", {}),
            "budget": {"steps": steps},
            "batch_size": 32,
            "log_every": 1,
            "precision": "bf16",
            "scaling": {"num_workers": 1, "use_gpu": use_gpu},
            "checkpoint": {"every_n_steps": None, "every_n_epochs": None},
            "storage": str(root / "runs"),
            "data": {"uri": str(root / "data" / task), "generate": spec["generate"]},
        }
    )


def run(task: str, root: Path, steps: int, use_gpu: bool) -> bool:
    started = time.perf_counter()
    result = run_stage(stage_config(task, root, steps, use_gpu))
    wall = time.perf_counter() - started
    losses = [record["loss"] for record in result.metrics.get("history", []) if "loss" in record]
    ok = bool(losses) and all(math.isfinite(loss) for loss in losses)
    print(
        f"{task:<15} precision {result.metrics.get('precision')}  loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
        f"{result.metric_name} {result.metric:.3f}  wall {wall:.0f} s  {'ok' if ok else 'LOSS NOT FINITE'}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per stage (default 12)")
    parser.add_argument("--cpu", action="store_true", help="CPU workers instead (checks this script, not a GPU)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("benchmarks/gpu_stages.py: no CUDA device here; the device check needs one GPU", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} on {'cpu' if args.cpu else torch.cuda.get_device_name()}")
    start_local(8, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(task, Path(tmp), args.steps, not args.cpu) for task in TASKS]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
