"""The driver of `test_multinode.py`: joins the cluster at argv[2], runs the stage whose config is the JSON in
argv[1], and prints one JSON line: the stage's outcome and which nodes its Train workers ran on."""

from __future__ import annotations

import json
import sys

import ray
from ray.util.state import list_actors

from rmoe_platform.config.stage import StageConfig
from rmoe_platform.stage.run import run_stage


def main() -> None:
    config = StageConfig.from_dict(json.loads(sys.argv[1]))
    ray.init(address=sys.argv[2], log_to_driver=False)
    result = run_stage(config)
    node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    workers = list_actors(sys.argv[2], filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    summary = {
        "step": result.metrics["step"],
        "resumed_from_step": result.metrics["resumed_from_step"],
        "world_size": result.metrics["world_size"],
        "val_loss": result.metrics["val_loss"],
        "checkpoint_uri": result.checkpoint_uri,
        "worker_nodes": sorted(node_ips[actor.node_id] for actor in workers),
        "dead_workers": sum(actor.state == "DEAD" for actor in workers),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
