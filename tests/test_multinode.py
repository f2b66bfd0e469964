"""A 2-node Ray cluster on loopback, started and stopped by the test: an expert-parallel stage with one Train
worker on each node, resumed after one worker's process dies.

The nodes are two loopback addresses, 127.0.0.3 (head) and 127.0.0.2: Ray keeps a node address as given
unless it is 127.0.0.1/localhost (which it turns into the machine's interface address outside its
single-machine mode, and single-machine mode takes no second node). Each node has one `slot`, and each
worker asks for one, so the two workers land on different nodes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from processes import StartupFailedError, free_ports, ray_cluster_env, start_retrying, startup_failure

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"


class Node:
    """One `ray start --block` in its own process group, its output kept in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.log_start = log.stat().st_size if log.exists() else 0  # this attempt's output starts here
        with log.open("a") as out:  # a start tried again on other ports appends: every attempt is kept
            self.process = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def node_ports() -> list[str]:
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port"]
    names += ["dashboard-agent-listen-port", "dashboard-agent-grpc-port"]
    return [f"--{name}={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]


def wait_for_nodes(address: str, env: dict[str, str], nodes: list[Node], count: int) -> None:
    probe = (
        f"import ray; ray.init(address='{address}', log_to_driver=False); "
        "print(len([n for n in ray.nodes() if n['Alive']]))"
    )
    deadline = time.monotonic() + 180
    while True:
        for node in nodes:
            if failure := startup_failure(node.process, node.log, node.log_start):
                raise StartupFailedError(f"a Ray node failed to start ({failure}):\n{node.tail()}")
        try:  # a probe of a cluster whose GCS never came up waits on its own timeouts: bounded here
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        assert time.monotonic() < deadline, "the cluster never had both nodes:\n" + "\n".join(n.tail() for n in nodes)
        time.sleep(2)


@pytest.fixture
def two_nodes(tmp_path_factory) -> Iterator[tuple[str, dict[str, str], list[Node]]]:
    logs = tmp_path_factory.mktemp("ray-logs")
    temp = Path("/tmp") / f"rmoe-2n-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    env = ray_cluster_env()
    nodes: list[Node] = []
    address = ""  # the head's, once it is up

    def start_node(args: Callable[[], list[str]], log: Path, count: int) -> None:
        """One more node on freshly picked ports, up once the cluster counts `count` nodes."""
        node = Node(args(), env, log)
        try:
            wait_for_nodes(address, env, [*nodes, node], count)
        except StartupFailedError:
            node.stop()
            raise
        nodes.append(node)

    def head_args() -> list[str]:
        nonlocal address
        gcs, dashboard, client = free_ports(3)
        address = f"{HEAD_IP}:{gcs}"
        return [
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs}",
            "--include-dashboard=true",  # Ray's state API (which node ran which worker)
            f"--dashboard-host={HEAD_IP}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            "--num-cpus=2",
            '--resources={"slot": 1}',
            f"--temp-dir={temp}/head",
            *node_ports(),
        ]

    def worker_args() -> list[str]:
        return [
            f"--address={address}",
            f"--node-ip-address={WORKER_IP}",
            "--num-cpus=2",
            '--resources={"slot": 1}',
            f"--temp-dir={temp}/worker",
            *node_ports(),
        ]

    try:
        start_retrying(lambda: start_node(head_args, logs / "head.log", 1))
        start_retrying(lambda: start_node(worker_args, logs / "worker.log", 2))
        yield address, env, nodes
    finally:
        for node in reversed(nodes):
            node.stop()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.mark.slow
def test_an_expert_parallel_stage_spans_two_nodes_and_survives_a_dead_worker(two_nodes, tmp_path: Path) -> None:
    address, env, nodes = two_nodes
    marker = tmp_path / "fault-happened"
    config = {
        "name": "two-nodes",
        "storage": str(tmp_path / "runs"),
        "model": {"moe": {"num_experts": 4, "top_k": 2}},
        "budget": {"steps": 6},
        "batch_size": 16,
        "log_every": 2,
        "max_failures": 1,
        "scaling": {"num_workers": 2, "expert_parallel_size": 2, "resources_per_worker": {"CPU": 1, "slot": 1}},
        "checkpoint": {"every_n_steps": 2, "keep": 3},
        "fault_injection": {"step": 5, "rank": 1, "marker": str(marker)},  # the worker's process exits
        "data": {
            "uri": str(tmp_path / "data"),
            "generate": {"num_train": 128, "num_val": 32, "num_classes": 10, "shard_rows": 32},
        },
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_driver.py"), json.dumps(config), address],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "\n".join(node.tail() for node in nodes)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{logs}"
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert marker.exists(), "the injected fault never fired"
    assert summary["step"] == 6 and summary["world_size"] == 2
    assert summary["resumed_from_step"] in (2, 4), "resumed from a checkpoint, not from the start"
    assert set(summary["worker_nodes"]) == {HEAD_IP, WORKER_IP}, "one Train worker on each node"
    assert summary["dead_workers"] >= 2, "the first worker group is gone: a new one finished the stage"
    assert (Path(summary["checkpoint_uri"]) / "model.safetensors").is_file()
