"""`jobs/sweep.py`: a Ray Tune sweep over one RMoE pipeline's settings, ending with the Pareto table (metric
versus cost) and the best setting per residual budget."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from rmoe_platform.cli.interrupts import Interrupted, interruptible
from rmoe_platform.cli.options import add_seeds, seeds_override
from rmoe_platform.cluster import connect, disconnect
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.results.store import ResultsWriteError


def parser(default_config: Path | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/sweep.py",
        description="Ray Tune sweep over one RMoE pipeline's settings; ends with the Pareto table (metric vs cost).",
    )
    parser.add_argument("--config", type=Path, default=default_config, help=f"sweep file (default: {default_config})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep field (experiment.* reaches the experiment preset)",
    )
    parser.add_argument("--results", help="results store: a local path or s3://bucket/prefix")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted sweep of the same name")
    add_seeds(parser)
    return parser


def main(argv: list[str], default_config: Path | None = None) -> int:
    args = parser(default_config).parse_args(argv)
    started = time.perf_counter()
    try:
        from rmoe_platform.sweep.config import SweepConfig
        from rmoe_platform.sweep.driver import SweepDriver

        if args.config is None:
            raise ConfigError("--config: a sweep file is required")
        overrides = list(args.overrides) + ([f"experiment.results={args.results}"] if args.results else [])
        if args.seeds:
            overrides.append(seeds_override(args.seeds, "experiment.seeds"))
        sweep = SweepConfig.load(args.config, overrides)
        driver = SweepDriver(sweep, resume=args.resume, log=lambda line: print(line, flush=True))
        driver.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    connect()  # first: ray.init installs SIGTERM handlers of its own (Python's and its core's)
    with interruptible():
        try:
            report = driver.run()
        except Interrupted as stop:
            print(stop.resume_hint(None, _resume_command(argv)), file=sys.stderr, flush=True)
            disconnect()
            return stop.exit_status
        except ResultsWriteError as err:
            print(f"error: {err}; checkpoints are kept: rerun `{_resume_command(argv)}`", file=sys.stderr, flush=True)
            disconnect()
            return 1
    print()
    print(report.table)
    elapsed = time.perf_counter() - started
    print(f"\nwall time {elapsed:.0f} s; rows in {sweep.experiment.results} with sweep_id {report.sweep_id}")
    return 0 if report.ok else 1


def _resume_command(argv: list[str]) -> str:
    return shlex.join(["jobs/sweep.py", *[a for a in argv if a != "--resume"], "--resume"])
