"""Run a sweep: check it, train the stages all trials share once, then a Ray Tune `Tuner` over the
settings (each trial a driver function building its own `TorchTrainer`s), resumable after the driver dies."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from rmoe_platform import storage
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.main_thread import off_the_main_thread
from rmoe_platform.pipelines.graph import plan_pipelines
from rmoe_platform.pipelines.outcomes import SweepTrial
from rmoe_platform.pipelines.runner import ExperimentRunner
from rmoe_platform.results import ResultsStore
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.sweep.config import SweepConfig
from rmoe_platform.sweep.plan import DATA_CPUS_PER_TRIAL, DRIVER_CPUS_PER_TRIAL, SweepPlan, build_plan
from rmoe_platform.sweep.progress import SweepProgress
from rmoe_platform.sweep.report import format_tables, trial_rows
from rmoe_platform.sweep.reporting import METRIC, TIME_ATTR
from rmoe_platform.sweep.trial import run_trial

STATE_FILE = "rmoe_sweep.json"  # beside Tune's state: the sweep's fingerprint, checked by --resume


@dataclass
class SweepReport:
    sweep_id: str
    rows: list[dict[str, Any]]
    table: str

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["status"] in ("succeeded", "stopped") for r in self.rows)


class SweepDriver:
    def __init__(self, sweep: SweepConfig, *, resume: bool = False, log: Callable[[str], None] = print) -> None:
        self.sweep = sweep
        self.resume = resume
        self.log = log
        exp = sweep.experiment
        self.access = S3Access.resolve(exp.s3)
        self.store = ResultsStore(exp.results, s3=self.access)
        self.state_uri = f"{storage.normalize(exp.storage).rstrip('/')}/{exp.name}/sweeps"
        self.plan: SweepPlan | None = None

    def validate(self) -> SweepPlan:
        """Everything that can fail before a trial starts (nothing is written): the experiment, every
        setting of the space, the resume state."""
        base = self.sweep.base_experiment
        runner = ExperimentRunner(base.for_seed(base.replicate_seeds[0]), self.store, s3=self.access, log=self.log)
        runner.validate()
        upstream_rows = runner.dataset_checks["experiment.upstream.data"].num_train
        plan = build_plan(self.sweep, self.access, upstream_rows)
        self._check_resume_state(plan.sweep_id)
        self.plan = plan
        return plan

    def run(self) -> SweepReport:
        plan = self.plan or self.validate()
        concurrency = self.sweep.max_concurrent_trials or max_concurrent_trials(self.sweep, plan)
        shared = ", ".join(sorted(plan.shared_stages)) or "none"
        self.log(
            f"sweep {plan.sweep_id}: pipeline {self.sweep.pipeline}, {self.sweep.search.algorithm} search over "
            f"{', '.join(plan.space.names)}; {expected_trials(self.sweep)} trial(s), up to {concurrency} at once; "
            f"shared stages: {shared}"
        )
        self._run_shared_stages(plan)
        if not self.resume:
            self._write_state(plan.sweep_id)
        tuner = self._tuner(plan, concurrency)
        off_the_main_thread(tuner.fit, "sweep-fit")  # Ctrl-C stops the job (cli.interrupts), not just Tune
        rows = trial_rows(self.store.read().table.to_pylist(), plan.sweep_id)
        budget = plan.space.budget_param()
        table = format_tables(rows, self.sweep.cost, self.sweep.experiment.metric_name, budget and budget.name)
        return SweepReport(plan.sweep_id, rows, table)

    # ---- steps ---------------------------------------------------------------------------------
    def _run_shared_stages(self, plan: SweepPlan) -> None:
        """The dense core (and whatever else no parameter changes) trains here once; trials find it in
        the stage cache and charge its cost to their pipeline, marked shared."""
        if not plan.shared_stages:
            return
        marker = SweepTrial(plan.sweep_id, "shared", {}, plan.shared_stages)
        for seed in plan.seeds:  # each seed's trials share that seed's dense core
            exp = self.sweep.base_experiment.for_seed(seed)
            runner = ExperimentRunner(exp, self.store, s3=self.access, log=self.log, trial=marker)
            outcomes = runner.run_stages(set(plan.shared_stages))
            failed = [o for o in outcomes.values() if not o.ok]
            if failed:
                stage, error = failed[0].node.key, failed[0].error
                raise RuntimeError(f"sweep {plan.sweep_id}: shared stage {stage} (seed {seed}) failed: {error}")

    def _tuner(self, plan: SweepPlan, concurrency: int) -> tune.Tuner:
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": DRIVER_CPUS_PER_TRIAL})
        fs, root = self._state_fs()
        path = f"{root.rstrip('/')}/{plan.sweep_id}"
        if self.resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
            self.log(f"sweep {plan.sweep_id}: resuming from {self.state_uri}/{plan.sweep_id}")
            return tune.Tuner.restore(
                path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
            )
        progress = SweepProgress(plan.sweep_id, self.sweep.base_experiment, expected_trials(self.sweep))
        progress.log = self.log
        search = self.sweep.search
        return tune.Tuner(
            trainable,
            param_space=plan.param_space(),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=search_algorithm(self.sweep, concurrency),
                scheduler=scheduler(self.sweep),
                num_samples=search.num_samples,
                # a Searcher is limited by Tune (ConcurrencyLimiter); the variant generator limits itself
                max_concurrent_trials=concurrency if search.algorithm == "optuna" else None,
                reuse_actors=reuse_trial_actors(self.sweep),
            ),
            run_config=tune.RunConfig(
                name=plan.sweep_id, storage_path=root, storage_filesystem=fs, callbacks=[progress], verbose=0
            ),
        )

    # ---- resume state --------------------------------------------------------------------------
    def _state_fs(self) -> tuple[Any, str]:
        if storage.is_remote(self.state_uri):
            return storage.filesystem(self.state_uri, "experiment.storage", self.access)
        return None, self.state_uri

    def _check_resume_state(self, sweep_id: str) -> None:
        state = self._read_state(sweep_id)
        rows = [r for r in self.store.read().table.to_pylist() if r.get("sweep_id") == sweep_id]
        exists = state is not None or bool(rows)
        if not self.resume and exists:
            raise ConfigError(
                f"sweep.name: a sweep {sweep_id!r} already exists ({len(rows)} row(s) in {self.store.uri}); "
                "pass --resume to finish it, or give this sweep another name"
            )
        if self.resume and not exists:
            raise ConfigError(f"--resume: no sweep {sweep_id!r} to resume under {self.state_uri} or in the results")
        if self.resume and state is not None and state.get("fingerprint") != self.sweep.fingerprint():
            raise ConfigError(
                f"--resume: sweep {sweep_id!r} was started with a different config (space, search, pipeline or "
                "experiment changed); resume it with the original config or start a new sweep name"
            )

    def _state_path(self, sweep_id: str) -> str:
        return f"{self.state_uri}/{sweep_id}/{STATE_FILE}"

    def _read_state(self, sweep_id: str) -> dict[str, Any] | None:
        uri = self._state_path(sweep_id)
        if not storage.exists(uri, self.access):
            return None
        fs, path = storage.filesystem(uri, "experiment.storage", self.access)
        try:
            return json.loads(storage.read_bytes(fs, path))
        except (OSError, ValueError) as err:
            raise ConfigError(f"--resume: cannot read the sweep state {uri!r}: {err}") from None

    def _write_state(self, sweep_id: str) -> None:
        payload = {"sweep_id": sweep_id, "fingerprint": self.sweep.fingerprint(), "config": self.sweep.to_dict()}
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        fs, path = storage.filesystem(self._state_path(sweep_id), "experiment.storage", self.access)
        storage.write_bytes(fs, path, data)


def reuse_trial_actors(sweep: SweepConfig) -> bool:
    """A finished trial's process runs the next trial (its imports and Ray worker start paid once), unless a
    scheduler may stop trials early: Tune can only reuse a process whose trial function has returned, and a
    trial stopped mid-fit is still winding its stage down, so the trial given its process would fail."""
    return sweep.scheduler.type == "none"


def search_algorithm(sweep: SweepConfig, concurrency: int) -> SearchAlgorithm | Searcher:
    if sweep.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.search.seed))
    return BasicVariantGenerator(random_state=sweep.search.seed, max_concurrent=concurrency)


def scheduler(sweep: SweepConfig) -> TrialScheduler:
    spec = sweep.scheduler
    if spec.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor, max_t=spec.max_t
    )


def expected_trials(sweep: SweepConfig) -> int | None:
    """Settings x seeds: each setting runs once per seed of the experiment."""
    space = sweep.search_space()
    grids = math.prod(len(p.values) for p in space.params if p.distribution == "grid")
    return grids * sweep.search.num_samples * len(sweep.base_experiment.replicate_seeds)


def max_concurrent_trials(sweep: SweepConfig, plan: SweepPlan) -> int:
    """As many trials as the cluster's CPUs and GPUs fit: each needs its own driver CPU, the largest of
    its (non-shared) stages' workers, and a CPU for Ray Data."""
    stages = plan_pipelines(sweep.base_experiment)[sweep.pipeline]
    scalings = [s.config.scaling for s in stages if s.key not in plan.shared_stages] or [sweep.experiment.scaling]
    cpus = DRIVER_CPUS_PER_TRIAL + DATA_CPUS_PER_TRIAL + max(s.total_cpus for s in scalings)
    gpus = max(s.total_gpus for s in scalings)
    cluster = ray.cluster_resources()
    fits = int(cluster.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(cluster.get("GPU", 0) // gpus))
    return max(1, fits)
