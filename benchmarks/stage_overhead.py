"""Stage overhead: the seconds each stage of a pipeline run spends outside training and evaluation (goal ≤ 10 s
per stage on local Ray), part by part from the stage's measured cost ledger (`rmoe_platform.cost.ledger`).

Runs the experiment preset (default: the demo, every pipeline) on a local Ray into a temporary results store
and prints, per stage, the ledger's parts: start (fit called → worker entered: controller, worker group,
process group, dataset split), setup (build or restore the model), ingest_start (waiting for each epoch's
and each validation's first batch), checkpoint, teardown (final report → fit returned), then overhead ÷ wall
time. Stages are trained, not read from a cache: the results store and checkpoints are fresh.

Stages that train one after the other in one fit (`stage.run.run_chain`: a core and the stages built on
it) are charged Ray Train's start once, on the fit's first stage; the summary gives those first stages and
the chained ones apart. Then, on the same Ray, it fits a `TorchTrainer` whose train function does nothing,
and prints that fit's start and teardown beside the first stages': the floor Ray Train itself sets for a
fit that starts its own worker group (controller, placement group, worker actors, process group). On Linux
it also prints where that floor's CPU goes, per Ray process (read from /proc while the empty fits run):
every fit starts a new process for its controller, for each worker, and for three helper actors
(placement-group cleaner, dataset manager, synchronisation actor), each paying Python's and Ray Train's
imports. Measured on 2 cores (smoke preset, two runs): 12.6-13.2 s of CPU per 1-worker empty fit (controller
3.9-4.2 s, worker 3.3-3.5 s, the three helpers 5.1-5.5 s) and a floor (start + teardown) of 9.3-10.0 s. A
fit's first stage, which also imports the model stack and waits for Ray Data's first batch, therefore cannot
keep its overhead within 10 s on such a machine, whatever the platform does around Ray Train.

    python benchmarks/stage_overhead.py                                       # demo preset, ~10 min
    python benchmarks/stage_overhead.py --config configs/smoke.yaml           # every pipeline, ~2 min
    python benchmarks/stage_overhead.py --pipelines dense,rmoe_d --set upstream.budget.epochs=1

A benchmark, not a test: the goal is marked met/MISSED but the exit status is that of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

import process_cpu  # noqa: E402  (beside this file)

from rmoe_platform.cli.pipeline import main as run_pipelines  # noqa: E402
from rmoe_platform.cost.ledger import COMPUTE_PARTS, DRIVER_PARTS, WORKER_PARTS  # noqa: E402
from rmoe_platform.results import ResultsStore  # noqa: E402

GOAL_OVERHEAD_SECONDS = 10.0  # per stage, outside training and evaluation
PARTS = (DRIVER_PARTS[0], *WORKER_PARTS, DRIVER_PARTS[1])  # in the order a stage spends them


def stage_table(rows: list[dict]) -> list[dict[str, float | str]]:
    """One entry per trained stage: its ledger's seconds per part, overhead and wall time."""
    table = []
    for row in sorted(rows, key=lambda r: r["started_at"]):
        ledger = row["ledger"] if isinstance(row["ledger"], dict) else json.loads(row["ledger"])
        parts = {part: float(ledger[f"{part}_seconds"]) for part in PARTS}
        compute = sum(parts[p] for p in COMPUTE_PARTS)
        wall = sum(parts.values())
        table.append({"stage": row["stage"], "steps": row["budget_steps"], **parts, "overhead": wall - compute})
        table[-1]["wall"] = wall
    return table


def print_table(table: list[dict[str, float | str]]) -> None:
    columns = [*PARTS, "overhead", "wall"]
    print(f"{'stage':<22}{'steps':>6}" + "".join(f"{c:>13}" for c in columns) + "   share  goal")
    for entry in table:
        overhead, wall = float(entry["overhead"]), float(entry["wall"])
        verdict = "met" if overhead <= GOAL_OVERHEAD_SECONDS else "MISSED"
        cells = "".join(f"{float(entry[c]):>13.1f}" for c in columns)
        print(f"{entry['stage']:<22}{entry['steps']:>6}{cells}   {overhead / wall:>5.0%}  {verdict}")
    overheads = [float(e["overhead"]) for e in table]
    print(
        f"\n{len(table)} stages: overhead per stage median {statistics.median(overheads):.1f} s, "
        f"mean {statistics.mean(overheads):.1f} s, max {max(overheads):.1f} s (goal ≤ {GOAL_OVERHEAD_SECONDS:.0f} s "
        f"each: {'met' if max(overheads) <= GOAL_OVERHEAD_SECONDS else 'MISSED'}); "
        f"{sum(overheads):.0f} s of {sum(float(e['wall']) for e in table):.0f} s of stage wall time is overhead"
    )
    fits = [e for e in table if float(e["start"]) > 0]  # a chain's later stages are charged no start
    chained = [float(e["overhead"]) for e in table if float(e["start"]) == 0]
    print(
        f"{len(fits)} fit(s) (Ray Train started once each, charged to its first stage: overhead "
        + ", ".join(f"{float(e['overhead']):.1f}" for e in fits)
        + " s)"
        + (f"; {len(chained)} chained stage(s): median {statistics.median(chained):.1f} s" if chained else "")
    )


def _enter(config: dict[str, str]) -> None:
    """The empty train function: only note when it was entered (the file lies on this machine: local Ray)."""
    Path(config["entered"]).write_text(repr(time.time()))


def empty_fit_floor(tmp: Path, repeats: int = 2) -> list[tuple[float, float]]:
    """(start, teardown) seconds of `repeats` fits of an empty train function on one 1-CPU worker: fit called →
    function entered, and function entered → fit returned."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    floors = []
    for attempt in range(repeats):
        entered = tmp / f"entered-{attempt}"
        trainer = TorchTrainer(
            _enter,
            train_loop_config={"entered": str(entered)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"empty-{attempt}", storage_path=str(tmp / "empty-fits")),
        )
        started = time.time()
        trainer.fit()
        ended = time.time()
        entered_at = float(entered.read_text())
        floors.append((entered_at - started, ended - entered_at))
    return floors


def print_floor_cpu(roles: dict[str, tuple[int, float]], fits: int) -> None:
    total = sum(cpu for _, cpu in roles.values())
    print(f"its CPU by Ray process over the {fits} empty fits ({total / fits:.1f} s per fit; sampled from /proc):")
    for role, (count, cpu) in sorted(roles.items(), key=lambda item: -item[1][1]):
        print(f"  {role:<36}{count:>3} process(es) {cpu:>7.1f} s   {cpu / fits:>5.1f} s per fit")


def print_floor(floors: list[tuple[float, float]], table: list[dict[str, float | str]]) -> None:
    starts, teardowns = [f[0] for f in floors], [f[1] for f in floors]
    floor = statistics.median(starts) + statistics.median(teardowns)
    print(
        f"Ray Train's floor (an empty train function, {len(floors)} fits on this Ray): start "
        + ", ".join(f"{s:.1f}" for s in starts)
        + " s; teardown "
        + ", ".join(f"{t:.1f}" for t in teardowns)
        + f" s; median start + teardown {floor:.1f} s"
    )
    above = [float(e["overhead"]) - floor for e in table if float(e["start"]) > 0]
    if above:
        median, largest = statistics.median(above), max(above)
        print(f"overhead of a fit's first stage above that floor: median {median:.1f} s, max {largest:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--pipelines", help="comma-separated subset (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data", default=str(ROOT / "runs" / "data"), help="dataset root (generated when absent)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = str(Path(tmp) / "results")
        argv_run = ["--config", str(args.config), "--results", results]
        argv_run += ["--set", f"storage={Path(tmp) / 'checkpoints'}", "--set", f"data.uri={args.data}"]
        argv_run += [item for override in args.overrides for item in ("--set", override)]
        if args.pipelines:
            argv_run += ["--pipelines", args.pipelines]
        started = time.perf_counter()
        status = run_pipelines(argv_run)
        elapsed = time.perf_counter() - started
        rows = [r for r in ResultsStore(results).rows(row_type="stage") if r["ledger"] and not r["cached"]]
        print(f"\n== stage overhead ({args.config.name}; the whole run took {elapsed:.0f} s) ==")
        table = stage_table(rows) if rows else []
        if table:
            print_table(table)
        import ray

        if ray.is_initialized():  # the run's own Ray, still up
            if not process_cpu.available():
                print_floor(empty_fit_floor(Path(tmp)), table)
                return status
            with process_cpu.ProcessCpu(select=lambda argv: argv[0].startswith(process_cpu.RAY_TITLE)) as processes:
                floors = empty_fit_floor(Path(tmp))
            print_floor(floors, table)
            print_floor_cpu(processes.by_role(), len(floors))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
