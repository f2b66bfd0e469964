"""Run an experiment's pipelines: each stage once (cached by content hash in the results store), rows
written as stages finish, a summary row per pipeline; the report holds the paper's comparison."""

from __future__ import annotations

import datetime as dt
import re
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from rmoe_platform import storage
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.cost.devices import device_table
from rmoe_platform.cost.ledger import StageLedger
from rmoe_platform.datasets.checks import DatasetCheck, check_dataset, ensure_dataset
from rmoe_platform.datasets.format import DatasetCard
from rmoe_platform.pipelines.accounting import Cost, same_cost, stage_cost, total
from rmoe_platform.pipelines.graph import StageNode, plan_pipelines, shared_keys
from rmoe_platform.pipelines.imported import inspect_core, materialize_core
from rmoe_platform.pipelines.model_checks import check_stage_models
from rmoe_platform.pipelines.outcomes import ExperimentReport, PipelineSummary, StageOutcome, SweepTrial
from rmoe_platform.pipelines.report import fmt
from rmoe_platform.pipelines.resume import CheckpointListing, find_resume_point, list_checkpoints, run_prefix
from rmoe_platform.results import ResultsStore
from rmoe_platform.results.rows import RowContext, git_commit, now, pipeline_row, row_cost, stage_row
from rmoe_platform.stage.run import ChainLink, ChainResult, StageResult, run_chain
from rmoe_platform.storage.s3 import S3Access, unreachable

# Given a stage about to run and what its finished ancestors cost, the Ray Train callbacks to run it with.
StageCallbacks = Callable[[StageNode, Cost], list[Any]]


class ExperimentRunner:
    def __init__(
        self,
        exp: ExperimentConfig,
        store: ResultsStore,
        *,
        log: Callable[[str], None] = print,
        chain_runner: Callable[..., ChainResult] = run_chain,
        s3: S3Access | None = None,
        trial: SweepTrial | None = None,
        stage_callbacks: StageCallbacks | None = None,
    ) -> None:
        if len(exp.replicate_seeds) > 1:
            raise ValueError(
                f"ExperimentRunner runs one seed; experiment {exp.name!r} has seeds {list(exp.seeds)} "
                "(run them with pipelines.replicates.run_replicates)"
            )
        exp = exp.for_seed(exp.replicate_seeds[0])
        self.exp = exp
        self.trial = trial
        self.stage_callbacks = stage_callbacks
        self.access = s3 or S3Access.resolve(exp.s3)
        self.store = store
        self.log = log
        self.chain_runner = chain_runner
        self.running: str | None = None  # the stage (or chain) training now (what an interruption stops)
        trial_fields = {"sweep_id": trial.sweep_id, "params": trial.params} if trial else {}
        devices = device_table(exp.devices)
        self.rows = RowContext(exp.name, exp.arch, git_commit(), exp.seed, devices=devices, **trial_fields)
        self._succeeded: dict[str, list[dict[str, Any]]] = {}
        # validate()'s stage graph and dataset checks, reused by run()
        self._validated: tuple[dict[str, list[StageNode]], dict[str, DatasetCheck]] | None = None

    def validate(self) -> dict[str, list[StageNode]]:
        """What can fail before any stage runs (nothing is written): storage and results locations, each
        dataset (present and valid, or generatable where it should be), an imported core (readable, of the
        experiment's architecture key by key), the stage graph, and every stage's model (built from its
        parent's spec on the meta device)."""
        storage.check_writable(self.exp.storage, field="experiment.storage", s3=self.access)
        self.store.check_writable()
        datasets = {
            field_path: check_dataset(spec, self.access, field_path) for field_path, spec in self.exp.datasets().items()
        }
        core = None
        if self.exp.upstream.imported:
            upstream = datasets.get("experiment.upstream.data")
            core = inspect_core(self.exp, self.access, upstream.num_classes if upstream else None)
        try:
            plans = plan_pipelines(self.exp, core)
        except ValueError as err:
            raise ConfigError(str(err) if isinstance(err, ConfigError) else f"experiment: {err}") from None
        specs = self.exp.datasets()
        check_stage_models(plans, {specs[field_path].uri: checked for field_path, checked in datasets.items()})
        self._validated = (plans, datasets)
        return plans

    @property
    def dataset_checks(self) -> dict[str, DatasetCheck]:
        """Each phase's dataset as `validate()` found it, keyed by config field."""
        if self._validated is None:
            self.validate()
        assert self._validated is not None
        return self._validated[1]

    def run(self) -> ExperimentReport:
        """Run every stage; validates first unless `validate()` already did (its checks are reused)."""
        plans, outcomes = self._run_nodes(None)
        shared = shared_keys(plans) | (self.trial.shared_stages if self.trial else frozenset())
        summaries = {p: PipelineSummary(p, [outcomes[s.key] for s in stages], shared) for p, stages in plans.items()}
        self.store.append(self._pipeline_rows(summaries))
        return ExperimentReport(self.exp.name, outcomes, summaries)

    def run_stages(self, keys: set[str]) -> dict[str, StageOutcome]:
        """Run only the stages named by `keys` (and their ancestors), writing stage rows but no pipeline
        rows: how a sweep trains the stages its trials share once, before the trials start."""
        return self._run_nodes(keys)[1]

    def _run_nodes(self, only: set[str] | None) -> tuple[dict[str, list[StageNode]], dict[str, StageOutcome]]:
        if self._validated is None:
            self.validate()
        assert self._validated is not None
        plans, datasets = self._validated
        for field_path, spec in self.exp.datasets().items():
            opened = ensure_dataset(spec, self.access, field_path, datasets[field_path])
            self.log(f"dataset {opened.card.name}: {opened.uri} ({_split_sizes(opened.card)})")
        self._succeeded = self._succeeded_stage_rows()
        users = {n.key: sorted(p for p, ss in plans.items() if n in ss) for stages in plans.values() for n in stages}
        wanted = None if only is None else {n.key for s in plans.values() for n in s if _leads_to(n, only, s)}
        outcomes: dict[str, StageOutcome] = {}
        for stages in plans.values():
            for node in stages:
                if node.key in outcomes or (wanted is not None and node.key not in wanted):
                    continue
                settled = self._settled(node, outcomes, users[node.key])
                if settled is not None:
                    outcomes[node.key] = settled
                    continue
                chain = self._chain(node, plans, outcomes, wanted)
                outcomes.update(self._train(chain, outcomes, users))
        return plans, outcomes

    # ---- stages --------------------------------------------------------------------------------
    def _settled(self, node: StageNode, outcomes: dict[str, StageOutcome], pipelines: list[str]) -> StageOutcome | None:
        """A stage that needs no training: skipped (its parent did not succeed), imported or cached."""
        parent = outcomes.get(node.parent.key) if node.parent else None
        if parent is not None and not parent.ok:
            self.log(f"[{node.key}] skipped: parent {parent.node.key} {parent.status}")
            return StageOutcome(node, "skipped", "", error=f"parent {parent.node.key} {parent.status}")
        if node.imported is not None:
            return self._imported(node, pipelines)
        cached = self._cached(node)
        if cached is not None:
            self.log(f"[{node.key}] cached (run {cached.run_id}, {node.metric_name} {fmt(cached.metric)})")
        return cached

    def _chain(
        self,
        head: StageNode,
        plans: dict[str, list[StageNode]],
        outcomes: dict[str, StageOutcome],
        wanted: set[str] | None,
    ) -> list[StageNode]:
        """`head` and the stages below it, in every pipeline, that train in the same fit, parents first: those
        to be trained (not run yet, wanted, not cached) on the same workers and storage. So a dense core and
        every stage built on it start Ray Train once. A sweep's stages train one per fit (each reports to
        its own Tune trial)."""
        chain, keys = [head], {head.key}
        if self.stage_callbacks is not None:
            return chain
        for stages in plans.values():  # each pipeline's stages come parents first
            for node in stages:
                if node.key in keys or node.parent is None or node.parent.key not in keys:
                    continue
                if node.key in outcomes or node.imported is not None or (wanted is not None and node.key not in wanted):
                    continue
                same_place = node.config.scaling == head.config.scaling and node.config.storage == head.config.storage
                if same_place and self._cached(node) is None:
                    chain.append(node)
                    keys.add(node.key)
        return chain

    def _train(
        self, chain: list[StageNode], outcomes: dict[str, StageOutcome], users: dict[str, list[str]]
    ) -> dict[str, StageOutcome]:
        """Train the chain's stages in one fit; a row per stage as the fit ends: succeeded, failed (the one
        the fit stopped in), or skipped (those below a failed one). The others are left for a later fit."""
        head = chain[0]
        parent = outcomes.get(head.parent.key) if head.parent else None
        config = head.config
        if parent is not None:
            config = replace(config, model=replace(config.model, parent_checkpoint=parent.checkpoint_uri))
        started = now()
        run_ids = [f"{run_prefix(node.key, node.resume_hash)}{uuid.uuid4().hex[:6]}" for node in chain]
        index_of = {node.key: index for index, node in enumerate(chain)}
        extra: dict[str, Any] = {}
        if self.stage_callbacks is not None:
            ancestors = [outcomes[n.key] for n in head.lineage[:-1]]
            extra["callbacks"] = self.stage_callbacks(head, total(a.cost for a in ancestors))
        chained = f" (chained with {', '.join(n.key for n in chain[1:])})" if len(chain) > 1 else ""
        self.running = head.key + chained  # stays set when an interruption (not an Exception) stops the fit
        try:
            listing = list_checkpoints(head.config.storage, self.access)  # once: the fit's stages share storage
            links = [
                ChainLink(
                    config if node is head else node.config,
                    run_id,
                    self._resume_from(node, listing),
                    parent=None if node is head else index_of[node.parent.key],  # type: ignore[union-attr]
                )
                for node, run_id in zip(chain, run_ids, strict=True)
            ]
            result = self.chain_runner(links, s3=self.access, **extra)
        except ConfigError:
            self.running = None
            raise
        except Exception as err:  # a chain that failed before its fit: its first stage failed
            result = ChainResult((), err)
        self.running = None
        trained: dict[str, StageOutcome] = {}
        for index, node in enumerate(chain):
            node_parent = parent if node is head else trained.get(node.parent.key)  # type: ignore[union-attr]
            users_of = users[node.key]
            if index < len(result.finished):
                trained[node.key] = self._record_success(node, result.finished[index], users_of, node_parent, started)
            elif index == len(result.finished):
                error = result.error
                trained[node.key] = self._record_failure(node, run_ids[index], error, users_of, node_parent, started)
            elif node_parent is not None and not node_parent.ok:
                skipped = self._settled(node, trained, users_of)
                assert skipped is not None and skipped.status == "skipped"
                trained[node.key] = skipped
        return trained

    def _record_success(
        self,
        node: StageNode,
        result: StageResult,
        pipelines: list[str],
        parent: StageOutcome | None,
        started: dt.datetime,
    ) -> StageOutcome:
        measured = result.cost
        cost = stage_cost(
            measured.train_flops,
            measured.device_seconds,
            measured.device_kind,
            self.exp.prices,
            measured.overhead_device_seconds,
        )
        outcome = StageOutcome(node, "succeeded", result.run_name, cost, result.metric, result.checkpoint_uri)
        self.store.append([self._stage_row(outcome, result, pipelines, parent, started, None)])
        self.log(
            f"[{node.key}] done in {measured.wall_seconds:.0f} s: {result.metric_name} {fmt(outcome.metric)}, "
            f"{cost.flops:.3g} FLOPs, {cost.device_seconds:.0f} device-s compute + "
            f"{cost.overhead_device_seconds:.0f} overhead ({_parts(measured.ledger)})"
        )
        return outcome

    def _record_failure(
        self,
        node: StageNode,
        run_id: str,
        err: Exception | None,
        pipelines: list[str],
        parent: StageOutcome | None,
        started: dt.datetime,
    ) -> StageOutcome:
        """A failed stage is recorded (with its traceback); the others go on."""
        assert err is not None
        outcome = StageOutcome(node, "failed", run_id, error=self._failure(err))
        trace = "".join(traceback.format_exception(err))
        self.store.append([self._stage_row(outcome, None, pipelines, parent, started, trace)])
        self.log(f"[{node.key}] FAILED: {outcome.error}")
        return outcome

    def _resume_from(self, node: StageNode, listing: CheckpointListing) -> str | None:
        """The newest whole checkpoint of an interrupted run of this stage, if any (said in the log)."""
        finished = {row["run_id"] for rows in self._succeeded.values() for row in rows}  # on any worker count
        prefix = run_prefix(node.key, node.resume_hash)
        resume = find_resume_point(
            node.config.storage, prefix, finished_runs=finished, access=self.access, log=self.log, listing=listing
        )
        workers = node.config.scaling.num_workers
        if resume is None:
            self.log(f"[{node.key}] running on {workers} worker(s) …")
            return None
        self.log(
            f"[{node.key}] resuming interrupted run {resume.run_name} from step {resume.step} on {workers} worker(s) …"
        )
        return resume.checkpoint_uri

    def _failure(self, err: Exception) -> str:
        """What a failed stage's row and log say: as raised, or, when storage could not be reached (an S3
        endpoint restarting, a network cut), that and what to do: its whole checkpoints are kept."""
        text = f"{type(err).__name__}: {err}"
        if not unreachable(text):
            return text
        operation = re.search(r"NETWORK_CONNECTION during (\w+) operation", text)
        during = f" ({operation.group(1)})" if operation else ""
        endpoint = (self.access.endpoint_url if self.access else None) or "of AWS"
        return (
            f"storage unreachable: the S3 endpoint {endpoint} could not be reached during the stage{during}; "
            "its whole checkpoints are kept: rerun once the endpoint is back and the stage resumes from the newest"
        )

    def _imported(self, node: StageNode, pipelines: list[str]) -> StageOutcome:
        """The imported core: written once as a platform checkpoint, charged its declared cost; its row is
        written once per identity and declared cost (a rerun reuses the run)."""
        core = node.imported
        assert core is not None
        started = now()
        uri = materialize_core(core, self.exp, self.access)
        for row in self._succeeded.get(node.config_hash, []):
            if row["status"] == "imported" and row["checkpoint_uri"] == uri and same_cost(row_cost(row), core.cost):
                self.log(f"[{node.key}] imported core (run {row['run_id']}): {core.summary()}")
                return StageOutcome(node, "imported", row["run_id"], core.cost, None, uri)
        run_id = f"{node.key}-imported-{node.config_hash[:8]}-{uuid.uuid4().hex[:6]}"
        outcome = StageOutcome(node, "imported", run_id, core.cost, None, uri)
        self.store.append([self._stage_row(outcome, None, pipelines, None, started, None)])
        self.log(f"[{node.key}] {core.summary()}")
        return outcome

    def _succeeded_stage_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Succeeded (and imported) stage runs by config hash, newest first (the store is read once per run)."""
        by_hash: dict[str, list[dict[str, Any]]] = {}
        for row in self.store.read().table.to_pylist():
            if row["row_type"] == "stage" and row["status"] in ("succeeded", "imported") and row["config_hash"]:
                by_hash.setdefault(row["config_hash"], []).append(row)
        oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
        for rows in by_hash.values():
            rows.sort(key=lambda r: r["finished_at"] or oldest, reverse=True)
        return by_hash

    def _cached(self, node: StageNode) -> StageOutcome | None:
        for row in self._succeeded.get(node.config_hash, []):
            uri = row["checkpoint_uri"]
            trained = row["status"] == "succeeded"
            if trained and uri and storage.exists(f"{uri.rstrip('/')}/model.safetensors", self.access):
                return StageOutcome(node, "cached", row["run_id"], row_cost(row), row["metric"], uri)
        return None

    # ---- rows ----------------------------------------------------------------------------------
    def _stage_row(
        self,
        outcome: StageOutcome,
        result: StageResult | None,
        pipelines: list[str],
        parent: StageOutcome | None,
        started: dt.datetime,
        trace: str | None,
    ) -> dict[str, Any]:
        in_trial = self.trial is not None and outcome.node.key in self.trial.shared_stages
        shared = len(pipelines) > 1 or in_trial
        return stage_row(
            self.rows, outcome, result, pipelines=pipelines, parent=parent, shared=shared, started=started, trace=trace
        )

    def _pipeline_rows(self, summaries: dict[str, PipelineSummary]) -> list[dict[str, Any]]:
        dense = summaries.get("dense")
        return [
            pipeline_row(self.rows, self.exp, summary, run_id=self._pipeline_run_id(name), dense=dense)
            for name, summary in summaries.items()
        ]

    def _pipeline_run_id(self, pipeline: str) -> str:
        return self.trial.run_id if self.trial else f"{self.exp.name}-{pipeline}-{uuid.uuid4().hex[:8]}"


def _leads_to(node: StageNode, keys: set[str], stages: list[StageNode]) -> bool:
    """Whether `node` is one of `keys` or an ancestor of one of them within its pipeline."""
    return any(s.key in keys and node in s.lineage for s in stages)


def _parts(ledger: StageLedger) -> str:
    return ", ".join(f"{name} {seconds:.0f}" for name, seconds in ledger.parts().items() if round(seconds))


def _split_sizes(card: DatasetCard) -> str:
    return ", ".join(f"{split} {info.num_rows}" for split, info in card.splits.items())
