"""Command-line front ends of the jobs (parse → build → run), kept out of `jobs/` so they are testable."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.names import PIPELINES


def pipeline_parser(default_config: Path | None) -> argparse.ArgumentParser:
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


def init_ray() -> None:
    """Join the cluster a submitted job runs on (RAY_ADDRESS), else start a local Ray; ship our code."""
    import ray

    import rmoe
    import rmoe_platform

    if ray.is_initialized():
        return
    # Directories, not module objects: a submitted job's runtime env is deep-copied when merged.
    modules = [str(Path(module.__file__).parent) for module in (rmoe, rmoe_platform)]
    if "RAY_ADDRESS" in os.environ:  # a submitted job, or a user pointing at a cluster
        ray.init(runtime_env={"py_modules": modules}, log_to_driver=False)
    else:  # a local Ray of our own, on loopback
        # Twice the cores as logical CPUs: Train workers mostly wait on the data, and the Ray Data decode
        # tasks need CPUs of their own (with one CPU per worker and no CPU left, ingest would stall).
        # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner needs:
        # without it, a trial stopped by ASHA would keep its workers' CPUs reserved for good.
        ray.init(
            num_cpus=2 * (os.cpu_count() or 1),
            runtime_env={"py_modules": modules},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )


def pipeline_main(argv: list[str], default_config: Path | None = None) -> int:
    args = pipeline_parser(default_config).parse_args(argv)
    try:
        exp = load_experiment(args)
        from rmoe_platform.results import ResultsStore
        from rmoe_platform.pipelines.runner import ExperimentRunner, format_report
        from rmoe_platform.storage.s3 import S3Access

        access = S3Access.resolve(exp.s3)
        runner = ExperimentRunner(exp, ResultsStore(exp.results, s3=access), s3=access)
        runner.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"experiment {exp.name}: pipelines {', '.join(exp.pipelines)}; results → {exp.results}", flush=True)
    init_ray()
    try:
        report = runner.run()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(format_report(report))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; results in {exp.results}")
    return 0 if report.ok else 1


def sweep_parser(default_config: Path | None) -> argparse.ArgumentParser:
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
    return parser


def sweep_main(argv: list[str], default_config: Path | None = None) -> int:
    args = sweep_parser(default_config).parse_args(argv)
    started = time.perf_counter()
    try:
        from rmoe_platform.sweep import SweepConfig, SweepDriver

        if args.config is None:
            raise ConfigError("--config: a sweep file is required")
        overrides = list(args.overrides) + ([f"experiment.results={args.results}"] if args.results else [])
        sweep = SweepConfig.load(args.config, overrides)
        driver = SweepDriver(sweep, resume=args.resume, log=lambda line: print(line, flush=True))
        driver.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray()
    report = driver.run()
    print()
    print(report.table)
    elapsed = time.perf_counter() - started
    print(f"\nwall time {elapsed:.0f} s; rows in {sweep.experiment.results} with sweep_id {report.sweep_id}")
    return 0 if report.ok else 1
