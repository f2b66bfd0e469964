"""`jobs/pipeline.py`: run an experiment's pipelines (dense, moe, rmoe_i, rmoe_d, upcycle) on Ray and print the
comparison of accuracy with training cost."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from rmoe_platform.cli.interrupts import Interrupted, interruptible
from rmoe_platform.cli.options import add_seeds, seeds_override
from rmoe_platform.cluster import connect, disconnect
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
    add_seeds(parser)
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print each pipeline's projected training cost (FLOPs, device-hours, GPU-days, dollars) and exit: "
        "nothing is trained, Ray is not started",
    )
    parser.add_argument(
        "--device", help="with --estimate: the device table's device (default: h100 for GPU configs, else cpu)"
    )
    parser.add_argument(
        "--calibrate-from",
        metavar="RESULTS",
        help="with --estimate: use the model FLOP utilisation measured on the device by the stages of this "
        "results store (a local path or s3://…) instead of the assumed one",
    )
    return parser


def load_experiment(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.pipelines:
        overrides.append(f"pipelines=[{args.pipelines}]")
    if args.results:
        overrides.append(f"results={args.results}")
    if args.seeds:
        overrides.append(seeds_override(args.seeds, "seeds"))
    return ExperimentConfig.load(args.config, overrides)


def main(argv: list[str], default_config: Path | None = None) -> int:
    args = parser(default_config).parse_args(argv)
    if (args.device or args.calibrate_from) and not args.estimate:
        print("error: --device and --calibrate-from go with --estimate", file=sys.stderr)
        return 2
    if args.estimate:
        return print_estimate(args)
    try:
        exp = load_experiment(args)
        from rmoe_platform.pipelines.replicates import ReplicatedRunner
        from rmoe_platform.pipelines.report import format_replicates, format_report
        from rmoe_platform.results import ResultsStore, ResultsWriteError
        from rmoe_platform.storage.s3 import S3Access

        access = S3Access.resolve(exp.s3)
        runner = ReplicatedRunner(exp, ResultsStore(exp.results, s3=access), s3=access)
        runner.validate()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    seeds = ", ".join(map(str, exp.replicate_seeds))
    pipelines = ", ".join(exp.pipelines)
    print(f"experiment {exp.name}: pipelines {pipelines}; seed(s) {seeds}; results → {exp.results}", flush=True)
    connect()  # first: ray.init installs SIGTERM handlers of its own (Python's and its core's)
    with interruptible():
        try:
            report = runner.run()
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Interrupted as stop:
            print(
                stop.resume_hint(runner.running, shlex.join(["jobs/pipeline.py", *argv])), file=sys.stderr, flush=True
            )
            disconnect()
            return stop.exit_status
        except ResultsWriteError as err:
            rerun = shlex.join(["jobs/pipeline.py", *argv])
            print(f"error: {err}; checkpoints are kept: rerun `{rerun}` to resume", file=sys.stderr, flush=True)
            disconnect()
            return 1
    for seed, single in report.reports.items():
        print(f"\nseed {seed}:" if len(report.reports) > 1 else "")
        print(format_report(single))
    if len(report.reports) > 1:
        print()
        print(format_replicates(report))
    print(f"\nwall time {time.perf_counter() - started:.0f} s; results in {exp.results}")
    return 0 if report.ok else 1


def print_estimate(args: argparse.Namespace) -> int:
    """`--estimate`: the projection of every pipeline's cost, from the config alone (no Ray, no training)."""
    try:
        exp = load_experiment(args)
        from rmoe_platform.cost.devices import DEVICES, device_table
        from rmoe_platform.cost.estimate import default_device, estimate, measured_utilisation
        from rmoe_platform.cost.tables import format_estimate

        measured = None
        if args.calibrate_from:
            from rmoe_platform.results import ResultsStore
            from rmoe_platform.storage.s3 import S3Access

            device = args.device or default_device(exp)
            store = ResultsStore(args.calibrate_from, s3=S3Access.resolve(exp.s3))
            measured = measured_utilisation(store.read().table.to_pylist(), device)
            if not measured:
                known = ", ".join(sorted(set(DEVICES) | set(device_table(exp.devices))))
                raise ConfigError(
                    f"--calibrate-from: no stage in {args.calibrate_from!r} measured a utilisation on {device!r} "
                    f"(devices: {known})"
                )
        print(format_estimate(estimate(exp, args.device, measured)))
        seeds = exp.replicate_seeds
        if len(seeds) > 1:
            print(f"seeds {', '.join(map(str, seeds))}: every pipeline runs once per seed, {len(seeds)}x these costs")
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
