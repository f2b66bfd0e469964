"""`jobs/pipeline.py`: run an experiment's pipelines (dense, moe, rmoe_i, rmoe_d, upcycle) on Ray and print the
comparison of accuracy with training cost."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rmoe_platform.cluster import connect
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.names import PIPELINES


def parser(default_config: Path | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobs/pipeline.py",
        description="Run RMoE pipelines (dense, moe, rmoe_i, rmoe_d, upcycle) and compare accuracy with cost.",
    )
    parser.add_argument(
        "--config", type=Path, default=default_config, help=f"experiment preset (default: {default_config})"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--pipelines", help=f"comma-separated subset of {','.join(PIPELINES)}")
    parser.add_argument("--results", help="results store: a local path or s3://bucket/prefix")
    return parser


def load_experiment(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.pipelines:
        overrides.append(f"pipelines=[{args.pipelines}]")
    if args.results:
        overrides.append(f"results={args.results}")
    return ExperimentConfig.load(args.config, overrides)


def main(argv: list[str], default_config: Path | None = None) -> int:
    args = parser(default_config).parse_args(argv)
    try:
        exp = load_experiment(args)
        from rmoe_platform.pipelines.report import format_report
        from rmoe_platform.pipelines.runner import ExperimentRunner
        from rmoe_platform.results import ResultsStore
        from rmoe_platform.storage.s3 import S3Access

        access = S3Access.resolve(exp.s3)
        runner = ExperimentRunner(exp, ResultsStore(exp.results, s3=access), s3=access)
        runner.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"experiment {exp.name}: pipelines {', '.join(exp.pipelines)}; results → {exp.results}", flush=True)
    connect()
    try:
        report = runner.run()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(format_report(report))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; results in {exp.results}")
    return 0 if report.ok else 1
