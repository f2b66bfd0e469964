"""An experiment run once per seed: each seed is a complete run of every pipeline (its own dense upstream,
shared by that seed's pipelines and cached like any stage), and the pipelines are compared over the seeds:
mean and confidence interval of each one's metric and compute cost, and paired differences to the dense
and MoE pipelines of the same seed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.pipelines.outcomes import ExperimentReport
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.results.replicates import Interval, interval, paired_difference
from rmoe_platform.storage.s3 import S3Access


@dataclass(frozen=True)
class ReplicateSummary:
    """One pipeline over the seeds: its metric and compute cost (device-seconds), and its metric's paired
    difference to the dense and MoE pipelines (None where that pipeline did not run or is this one)."""

    pipeline: str
    seeds: tuple[int, ...]  # the seeds whose run of this pipeline succeeded
    metric: Interval | None
    compute_seconds: Interval | None
    vs_dense: Interval | None
    vs_moe: Interval | None


@dataclass
class ReplicatedReport:
    experiment: str
    reports: dict[int, ExperimentReport]  # by seed

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.reports.values())

    @property
    def pipelines(self) -> list[str]:
        return list(next(iter(self.reports.values())).summaries)

    def per_seed(self, pipeline: str, value: Callable[[Any], float | None]) -> dict[int, float | None]:
        """`value(summary)` of `pipeline` per seed (None where that seed's run failed)."""
        out: dict[int, float | None] = {}
        for seed, report in self.reports.items():
            summary = report.summaries.get(pipeline)
            out[seed] = value(summary) if summary is not None and summary.ok else None
        return out

    def summary(self, pipeline: str) -> ReplicateSummary:
        metric = self.per_seed(pipeline, lambda s: s.metric)
        compute = self.per_seed(pipeline, lambda s: s.cost.device_seconds)
        names = self.pipelines

        def versus(reference: str) -> Interval | None:
            if reference == pipeline or reference not in names:
                return None
            return paired_difference(metric, self.per_seed(reference, lambda s: s.metric))

        seeds = tuple(seed for seed, value in metric.items() if value is not None)
        return ReplicateSummary(
            pipeline, seeds, interval(metric.values()), interval(compute.values()), versus("dense"), versus("moe")
        )

    def summaries(self) -> list[ReplicateSummary]:
        return [self.summary(pipeline) for pipeline in self.pipelines]


class ReplicatedRunner:
    """Every pipeline once per seed of `exp.replicate_seeds`, seed after seed. `validate()` checks each
    seed's run before the first stage of any seed trains (nothing is written when one fails)."""

    def __init__(
        self,
        exp: ExperimentConfig,
        store: ResultsStore,
        *,
        s3: S3Access | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        access = s3 or S3Access.resolve(exp.s3)
        self.exp = exp
        self.runners: dict[int, ExperimentRunner] = {}
        for seed in exp.replicate_seeds:
            prefix = f"[seed {seed}] " if len(exp.replicate_seeds) > 1 else ""
            self.runners[seed] = ExperimentRunner(
                exp.for_seed(seed), store, s3=access, log=lambda line, p=prefix: log(p + line)
            )

    def validate(self) -> None:
        for runner in self.runners.values():
            runner.validate()

    @property
    def running(self) -> str | None:
        """The stage training now, with its seed when there are several (what an interruption stops)."""
        for seed, runner in self.runners.items():
            if runner.running is not None:
                return f"{runner.running} (seed {seed})" if len(self.runners) > 1 else runner.running
        return None

    def run(self) -> ReplicatedReport:
        return ReplicatedReport(self.exp.name, {seed: runner.run() for seed, runner in self.runners.items()})
