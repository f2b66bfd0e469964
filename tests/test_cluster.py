"""A local Ray started the way the tests (`start_local`) and the jobs (`connect`) start it binds every process
to loopback: the node address each process runs with is read from the running processes themselves
(command lines of the GCS server, raylet, dashboard and agents; `sys.argv` of task and actor workers,
whose command line Ray overwrites with their title), in a fresh interpreter that starts and stops its Ray,
also where an earlier `ray start` left its address behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rmoe_platform import cluster

PROBE = textwrap.dedent(
    r"""
    import json, os, re, sys
    import ray  # imported before the start, as in the tests and jobs: the fix must not depend on import order
    from rmoe_platform import cluster

    sys.path.insert(0, sys.argv[2])  # the tests' folder
    from processes import cmdline, descendants

    IP = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")

    if sys.argv[1] == "tests":
        cluster.start_local(2, namespace="probe")
    else:
        cluster.connect()

    @ray.remote
    def task_argv():
        return ray.util.get_node_ip_address(), sys.argv

    @ray.remote
    class Actor:
        def argv(self):
            return ray.util.get_node_ip_address(), sys.argv

        def env(self):
            names = [*cluster.TRAIN_CONTROLLER_ENV, *cluster.LOCAL_TRAIN_ENV, "PROBE"]
            return {name: os.environ.get(name) for name in names}

    task_ip, task_args = ray.get(task_argv.remote())
    actor_ip, actor_args = ray.get(Actor.remote().argv.remote())
    # created as Ray Train creates its controller: env vars of its own, merged with the job's
    controller_env = ray.get(Actor.options(runtime_env={"env_vars": {"PROBE": "1"}}).remote().env.remote())
    processes = {}
    for pid in descendants(os.getpid()):
        args = cmdline(pid)
        names = [os.path.basename(a) for a in args if a.endswith((".py", "gcs_server", "raylet"))]
        if names:
            processes[names[0]] = sorted(set(IP.findall(" ".join(args))))
    processes["task worker"] = sorted(set(IP.findall(" ".join(task_args))))
    processes["actor worker"] = sorted(set(IP.findall(" ".join(actor_args))))
    reported = {
        "task": task_ip,
        "actor": actor_ip,
        "driver": ray.util.get_node_ip_address(),
        "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
    }
    ray.shutdown()
    print(json.dumps({"processes": processes, "reported": reported, "controller_env": controller_env}))
    """
)


@pytest.fixture
def ray_temp_dir() -> Iterator[Path]:
    """A Ray temp folder (`RAY_TMPDIR`) where a `ray start` recorded a cluster that has since stopped: a local
    Ray must start anyway, not join it. Short, under /tmp: Ray's socket paths inside it must stay under 108
    bytes, which a pytest tmp_path can pass."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # the discard port: nothing answers
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("how", ["tests", "jobs"])
def test_every_local_ray_process_runs_on_loopback(how: str, ray_temp_dir: Path) -> None:
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PATH": "/usr/bin:/bin", "RAY_TMPDIR": str(ray_temp_dir)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, how, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    processes, reported = seen["processes"], seen["reported"]
    for required in ("gcs_server", "raylet", "task worker", "actor worker"):
        assert processes.get(required), f"{required}: no node address seen ({sorted(processes)})"
    not_loopback = {name: ips for name, ips in processes.items() if set(ips) - {"127.0.0.1"}}
    assert not_loopback == {}, f"processes with another address: {not_loopback}"
    assert reported == {"task": "127.0.0.1", "actor": "127.0.0.1", "driver": "127.0.0.1", "nodes": ["127.0.0.1"]}
    # Ray Train's controller polls at the interval set for the job (the stages' teardown depends on it), and
    # on a local Ray starts no preemption watcher
    assert seen["controller_env"] == {**cluster.TRAIN_CONTROLLER_ENV, **cluster.LOCAL_TRAIN_ENV, "PROBE": "1"}
