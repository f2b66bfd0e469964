"""Where Ray runs: join the cluster a submitted job runs on, or start a local Ray whose every process binds
to loopback. The one place that starts Ray: the jobs (`connect`), the tests and the benchmarks
(`start_local`) all go through it.

Why more than `ray.init(_node_ip_address="127.0.0.1")`: Ray 2.60 turns a loopback node address back into
the machine's interface address on purpose (`ray._private.services.resolve_ip_for_localhost`: "make sure
localhost isn't resolved to the loopback ip"), except in its single-machine mode (`ray_constants.
ENABLE_RAY_CLUSTER` false, what `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` sets when `ray` is imported). The
head passes that one address to every process it starts (GCS, raylet, dashboard and agents, workers,
and Ray Train's `MASTER_ADDR`), so single-machine mode during `ray.init` is enough; it is switched on
for that call only, since `ray` is often imported long before. A `ray start --head` this machine starts
for itself gets the same mode from `SINGLE_MACHINE_ENV` (such a cluster cannot take other nodes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
# The environment of a `ray start --head --node-ip-address=127.0.0.1` that keeps every process on loopback.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray Train's controller polls its workers every 2 s by default and needs several polls to take a stage's final
# checkpoint report and see the workers finish: measured 5.0 s from the final report to `fit` returning at 2 s,
# 1.0-2.0 s at 0.5 s (an empty train function reporting a 1 MiB checkpoint). A poll is one small RPC per
# worker. Ray reads it in the controller's process, so it travels in the job's runtime environment.
TRAIN_CONTROLLER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# A local Ray is one machine that nothing drains (no autoscaler, no spot node): Ray Train's preemption watcher,
# one more actor process per fit polling the node's drain state, has nothing to watch there. It cost 1.6 s of
# CPU per fit here (a process start and Ray Train's imports), on the two cores the fit itself needs. A cluster
# joined through `connect` keeps it.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode while the head starts: a loopback node address is then kept as given."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local(
    num_cpus: int,
    *,
    include_dashboard: bool = True,
    namespace: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> Any:
    """Start a local Ray (head and workers on this machine) bound to loopback; returns Ray's context.

    `include_dashboard`: the dashboard process serves Ray's state API, which Ray Train's placement-group
    cleaner needs (without it, a trial stopped by ASHA would keep its workers' CPUs reserved for good).

    Always a new Ray (`address="local"`): without an address, `ray.init` joins the cluster the last `ray start`
    on this machine recorded (`<temp dir>/ray/ray_current_cluster`), whoever started it, and then refuses
    `num_cpus`, or fails on a cluster since stopped.
    """
    import ray

    runtime_env = _with_controller_env(runtime_env, LOCAL_TRAIN_ENV)
    with _single_machine_mode():
        return ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=include_dashboard,
            dashboard_host=LOOPBACK,
            log_to_driver=False,
            namespace=namespace,
            runtime_env=runtime_env,
            _node_ip_address=LOOPBACK,
        )


def connect() -> None:
    """Join the cluster a submitted job runs on (`RAY_ADDRESS`, set by `ray job submit` and KubeRay), else
    start a local Ray on loopback; either way ship this checkout's `rmoe` and `rmoe_platform`."""
    import ray

    import rmoe
    import rmoe_platform

    if ray.is_initialized():
        return
    # Directories, not module objects: a submitted job's runtime env is deep-copied when merged.
    modules = [str(Path(module.__file__).parent) for module in (rmoe, rmoe_platform)]
    if "RAY_ADDRESS" in os.environ:
        ray.init(runtime_env=_with_controller_env({"py_modules": modules}), log_to_driver=False)
        return
    # Twice the cores as logical CPUs: Train workers mostly wait on the data, and the Ray Data decode
    # tasks need CPUs of their own (with one CPU per worker and no CPU left, ingest would stall).
    start_local(2 * (os.cpu_count() or 1), runtime_env={"py_modules": modules})


def _with_controller_env(runtime_env: dict[str, Any] | None, *extra: dict[str, str]) -> dict[str, Any]:
    """The job's runtime environment with `TRAIN_CONTROLLER_ENV` and `extra` added (the caller's own
    variables win)."""
    runtime_env = dict(runtime_env or {})
    added = {key: value for env in (TRAIN_CONTROLLER_ENV, *extra) for key, value in env.items()}
    runtime_env["env_vars"] = {**added, **runtime_env.get("env_vars", {})}
    return runtime_env


def disconnect() -> None:
    """Leave the cluster (a local Ray this process started stops with it): how an interrupted job ends,
    so its workers stop with it instead of dying of the terminal's signal one by one."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
