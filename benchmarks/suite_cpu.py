"""Where a command's CPU goes (default: the test suite, `make test`): the machine's busy and idle CPU while it
runs, and the CPU of every process it (or anything else on the machine) ran meanwhile, by role and by group.

Why: on a machine the suite keeps busy, its wall time is its CPU divided by the cores, and much of that CPU is
not the tests' own work but processes Ray starts for every fit (Train controller, placement-group cleaner,
dataset manager, synchronisation actor, Ray Data's split coordinator, this platform's decode ledger) and for
every Ray it starts (GCS, raylet, dashboard and agents, log monitor, ...). Dividing those groups' CPU by the
cores gives the wall time they alone take, whatever the tests do around them: the suite cannot be faster than
that on this machine without fewer fits or fewer Rays.

    python benchmarks/suite_cpu.py --log /tmp/suite.log                  # make test, its output in the log
    python benchmarks/suite_cpu.py --log /tmp/sweep.log -- .venv/bin/python -m pytest tests/test_sweep.py

Measures the whole machine: run nothing else meanwhile. Linux only. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import process_cpu

ROOT = Path(__file__).resolve().parents[1]

# role → group; roles not named here are "tests, drivers and the rest" (pytest, jobs, moto, Chromium, ...)
PER_FIT = "per fit: Ray Train's controller and helpers, Ray Data's split, the decode ledger"
PER_RAY = "per Ray: GCS, raylet, dashboard, agents, log monitor, idle workers"
GROUPS: dict[str, str] = {
    **dict.fromkeys(
        (
            "TrainController",
            "PlacementGroupCleaner",
            "DatasetManager",
            "SynchronizationActor",
            "PreemptionWatcher",
            "SplitCoordinator",
            "DecodeLedger",
        ),
        PER_FIT,
    ),
    "RayTrainWorker": "Ray Train workers (training, evaluation, and their own start)",
    **dict.fromkeys(("ImplicitFunc", "_QueueActor"), "Ray Tune trials (sweep drivers, result queues)"),
    **dict.fromkeys(
        (
            "gcs_server",
            "raylet",
            "DashboardAgent",
            "RuntimeEnvAgent",
            "IDLE",
            "_StatsActor",
            "_AutoscalingCoordinatorActor",
            "ray/dashboard/dashboard.py",
            "ray/_private/log_monitor.py",
            "ray/autoscaler/_private/monitor.py",
            "ray/_private/workers/default_worker.py",
        ),
        PER_RAY,
    ),
}
OTHER = "tests, drivers and the rest"
RAY_DATA_TASKS = "Ray Data tasks (read, decode)"


def group_of(role: str) -> str:
    if role in GROUPS:
        return GROUPS[role]
    if role.startswith(("ray-dashboard-", "-c from multiprocessing.forkserver", "-c from multiprocessing.resource")):
        return PER_RAY  # the dashboard's modules, its fork server and resource tracker
    if role.startswith(("MapBatches", "ReadParquet", "Read", "Map(", "split")):
        return RAY_DATA_TASKS
    return OTHER


def report(cpu: process_cpu.ProcessCpu, wall: float, top: int) -> None:
    roles = cpu.by_role()
    cores = os.cpu_count() or 1
    busy, idle = cpu.busy_seconds, cpu.idle_seconds
    print(
        f"\n== CPU while the command ran: {wall:.0f} s wall on {cores} cores; machine busy {busy:.0f} CPU-s, "
        f"idle {idle:.0f} CPU-s ({busy / max(busy + idle, 1e-9):.0%} busy) =="
    )
    groups: dict[str, float] = {}
    for role, (_, seconds) in roles.items():
        groups[group_of(role)] = groups.get(group_of(role), 0.0) + seconds
    sampled = sum(groups.values())
    print(f"by group ({sampled:.0f} CPU-s sampled in processes; the rest ended between samples or ran in the kernel):")
    for group, seconds in sorted(groups.items(), key=lambda item: -item[1]):
        share = seconds / max(busy, 1e-9)
        print(f"  {seconds:>8.0f} CPU-s  {share:>4.0%}  = {seconds / cores:>6.0f} s of wall  {group}")
    fits = roles.get("TrainController", (0, 0.0))[0]
    rays = roles.get("gcs_server", (0, 0.0))[0]
    per_fit, per_ray = groups.get(PER_FIT, 0.0), groups.get(PER_RAY, 0.0)
    if fits:
        print(f"{fits} fit(s) (Train controllers started): {per_fit / fits:.1f} CPU-s each in per-fit processes")
    if rays:
        print(f"{rays} Ray(s) started: {per_ray / rays:.1f} CPU-s each in their daemons (start and idle time)")
    print(
        f"per-fit and per-Ray processes alone: {(per_fit + per_ray) / cores:.0f} s of wall on {cores} cores "
        f"({(per_fit + per_ray) / max(busy, 1e-9):.0%} of the busy CPU)"
    )
    print(f"top {top} roles:")
    for role, (count, seconds) in sorted(roles.items(), key=lambda item: -item[1][1])[:top]:
        print(f"  {seconds:>8.1f} CPU-s  {count:>4} process(es)  {role}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between /proc samples")
    parser.add_argument("--top", type=int, default=25, help="roles listed one by one")
    parser.add_argument("--log", type=Path, help="the command's output goes here (default: this terminal)")
    parser.add_argument("command", nargs="*", default=["make", "test"], help="after --; default: make test")
    args = parser.parse_args(argv)
    if not process_cpu.available():
        print("suite_cpu: needs Linux's /proc", file=sys.stderr)
        return 2
    output = args.log.open("w") if args.log else None
    try:
        with process_cpu.ProcessCpu(args.interval, new_only=False) as cpu:
            started = time.perf_counter()
            status = subprocess.call(
                args.command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT if output else None
            )
            wall = time.perf_counter() - started
    finally:
        if output:
            output.close()
    report(cpu, wall, args.top)
    print(f"command exited {status}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
