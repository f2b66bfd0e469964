"""Where Ray runs: join the cluster a submitted job runs on, or start a local Ray whose every process binds
to loopback. The one place that starts Ray: the jobs (`connect`), the tests and the benchmarks
(`start_local`) all go through it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


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
    """
    import ray

    return ray.init(
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
        ray.init(runtime_env={"py_modules": modules}, log_to_driver=False)
        return
    # Twice the cores as logical CPUs: Train workers mostly wait on the data, and the Ray Data decode
    # tasks need CPUs of their own (with one CPU per worker and no CPU left, ingest would stall).
    start_local(2 * (os.cpu_count() or 1), runtime_env={"py_modules": modules})
