"""The paper's pipelines as graphs of stages; shared stages are one node, identified by content hash.

With `upstream.checkpoint` set, the upstream dense stage is an *imported* node (kind `imported`, keyed by
the file's content hash, see `pipelines.imported`): nothing trains it, and the pipelines below that start
from the dense core start from it.

- dense (lower bound): upstream dense → downstream dense
- moe (upper bound): upstream MoE from scratch → downstream MoE
- rmoe_i: upstream dense → short residual stage on upstream data (core from the dense model, experts =
  core + noise, alignment on, core frozen) → downstream MoE
- rmoe_d: upstream dense → downstream MoE directly (upcycled at the start of the downstream stage)
- upcycle (Sparse-Upcycling-style): upstream dense → short stage on upstream data with all weights
  trainable (experts are copies + noise) → downstream MoE
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rmoe import MoEConfig
from rmoe_platform.config.experiment import ExperimentConfig, PhaseConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import BudgetConfig, DataSpec, ModelConfig, StageConfig
from rmoe_platform.datasets.scenes import NEUTRAL_RECIPE_FIELDS
from rmoe_platform.names import METRIC_NAMES, PIPELINES

if TYPE_CHECKING:
    from rmoe_platform.pipelines.imported import ImportedCore

# Fields that do not change what a stage computes (where it writes, how it logs, test hooks).
_HASH_EXCLUDED = {
    "name",
    "storage",
    "s3",
    "log_every",
    "max_failures",
    "fault_injection",
    "checkpoint",
    "evaluate_at_start",
}


@dataclass(frozen=True)
class StageNode:
    key: str  # unique within the experiment, e.g. "upstream_dense", "rmoe_i/downstream"
    kind: str  # upstream_dense | imported | upstream_moe | residual | upcycle | downstream
    config: StageConfig  # model.parent_checkpoint is filled in at run time from the parent's result
    parent: StageNode | None
    config_hash: str
    imported: ImportedCore | None = None  # set on an imported core (its config only records the model)

    @property
    def resume_hash(self) -> str:
        """What a rerun must match to continue an interrupted run of this stage: the config hash less how
        the stage is spread over workers (the global batch is fixed), so a run continues on any worker count."""
        return stage_hash(self.config, self.parent and self.parent.config_hash, ignore=("scaling",))

    @property
    def metric_name(self) -> str:
        """The validation metric of the stage's task (accuracy, mIoU, bbox_mAP)."""
        return METRIC_NAMES[self.config.task]

    @property
    def lineage(self) -> list[StageNode]:
        chain, node = [], self
        while node is not None:
            chain.append(node)
            node = node.parent
        return chain[::-1]


# Fields added after stages were first cached, each with the value that computes what every stage computed
# before the field existed: at that value a field stays out of the hash, so cached stages keep theirs.
_NEUTRAL_ADDITIONS: dict[tuple[str, ...], Any] = {
    ("compile",): False,
    ("optim", "schedule"): "cosine",
    ("optim", "power"): 1.0,
    ("optim", "milestones"): (),
    ("optim", "gamma"): 0.1,
    ("optim", "warmup_start_factor"): None,
    **{("data", "generate", name): neutral for name, neutral in NEUTRAL_RECIPE_FIELDS.items()},
}


def stage_hash(config: StageConfig, parent_hash: str | None, ignore: Collection[str] = ()) -> str:
    """Content hash of what the stage computes: its config (minus run-time fields and `ignore`) and its parent.

    Fields added later enter the hash only where they change the computation (`_NEUTRAL_ADDITIONS`; and
    `precision` wherever the arithmetic stays fp32, e.g. `auto` on CPU workers)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _HASH_EXCLUDED and k not in ignore}
    data["model"] = {k: v for k, v in data["model"].items() if k != "parent_checkpoint"}
    if config.computes_in_fp32:
        del data["precision"]
    for (*parents, name), neutral in _NEUTRAL_ADDITIONS.items():
        owner = data
        for parent in parents:
            owner = owner.get(parent) if isinstance(owner, dict) else None
        if isinstance(owner, dict) and name in owner and owner[name] == neutral:
            del owner[name]
    payload = json.dumps({"stage": data, "parent": parent_hash}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class _Planner:
    """Builds an experiment's stage nodes; a node asked for twice (the dense core) is built once."""

    def __init__(self, exp: ExperimentConfig, core: ImportedCore | None) -> None:
        if exp.upstream.imported and core is None:
            raise ConfigError(
                "experiment.upstream.checkpoint: the stage graph keys an imported core by its content; "
                "inspect it first (ExperimentRunner.validate)"
            )
        self.exp = exp
        self.core = core if exp.upstream.imported else None
        self.nodes: dict[str, StageNode] = {}

    def node(self, key: str, kind: str, config: StageConfig, parent: StageNode | None) -> StageNode:
        if key not in self.nodes:
            self.nodes[key] = StageNode(key, kind, config, parent, stage_hash(config, parent and parent.config_hash))
        return self.nodes[key]

    def moe(self, *, residual: bool) -> MoEConfig:
        return self.exp.moe.config(residual=residual)

    def dense_upstream(self) -> StageNode:
        if self.core is not None:
            return self.imported_core(self.core)
        config = _stage(self.exp, "upstream_dense", self.exp.upstream)
        return self.node("upstream_dense", "upstream_dense", config, None)

    def imported_core(self, core: ImportedCore) -> StageNode:
        """The dense core read from `upstream.checkpoint`: keyed by its content, never trained (its config
        records the model the children load and where the experiment's checkpoints live)."""
        key = "upstream_dense"
        if key not in self.nodes:
            exp = self.exp
            phase = replace(exp.upstream, budget=exp.upstream.budget or BudgetConfig(steps=1))  # unused
            config = _stage(exp, key, phase, data=exp.upstream.data or exp.downstream.data)
            classes = core.spec.model_kwargs.get("num_classes")
            config = replace(config, model=replace(config.model, num_classes=classes or None))
            self.nodes[key] = StageNode(key, "imported", config, None, core.identity, core)
        return self.nodes[key]

    def intermediate(self, key: str, kind: str, parent: StageNode, moe: MoEConfig, **fields: Any) -> StageNode:
        """A short stage on upstream data (the RMoE-I residual stage, the upcycling stage)."""
        name = key.replace("/", "-")
        config = _stage(self.exp, name, self.exp.intermediate, data=self.exp.intermediate_data, moe=moe, **fields)
        return self.node(key, kind, config, parent)

    def downstream(self, pipeline: str, parent: StageNode, moe: MoEConfig | None = None) -> StageNode:
        exp = self.exp
        config = _stage(exp, f"{pipeline}-downstream", exp.downstream, moe=moe, moe_model=pipeline != "dense")
        return self.node(f"{pipeline}/downstream", "downstream", config, parent)


def _dense(plan: _Planner) -> StageNode:
    return plan.downstream("dense", plan.dense_upstream())


def _moe_from_scratch(plan: _Planner) -> StageNode:
    config = _stage(plan.exp, "upstream_moe", plan.exp.upstream, moe=plan.moe(residual=False))
    return plan.downstream("moe", plan.node("upstream_moe", "upstream_moe", config, None))


def _rmoe_i(plan: _Planner) -> StageNode:
    residual = plan.intermediate(
        "rmoe_i/residual",
        "residual",
        plan.dense_upstream(),
        plan.moe(residual=True),
        trainable=("residual", "router"),
    )
    return plan.downstream("rmoe_i", residual)


def _rmoe_d(plan: _Planner) -> StageNode:
    return plan.downstream("rmoe_d", plan.dense_upstream(), plan.moe(residual=True))


def _upcycle(plan: _Planner) -> StageNode:
    copies = plan.intermediate("upcycle/intermediate", "upcycle", plan.dense_upstream(), plan.moe(residual=False))
    return plan.downstream("upcycle", copies)


# pipeline name -> the builder of its last stage (its lineage is the pipeline)
PIPELINE_BUILDERS: dict[str, Callable[[_Planner], StageNode]] = {
    "dense": _dense,
    "moe": _moe_from_scratch,
    "rmoe_i": _rmoe_i,
    "rmoe_d": _rmoe_d,
    "upcycle": _upcycle,
}
assert tuple(PIPELINE_BUILDERS) == PIPELINES, "every pipeline name has a builder, in the names' order"


def plan_pipelines(exp: ExperimentConfig, core: ImportedCore | None = None) -> dict[str, list[StageNode]]:
    """Each requested pipeline's stages in order; nodes shared between pipelines are the same object.
    `core`: the inspected `upstream.checkpoint` (required when the experiment imports its core)."""
    planner = _Planner(exp, core)
    return {pipeline: PIPELINE_BUILDERS[pipeline](planner).lineage for pipeline in exp.pipelines}


def shared_keys(plans: dict[str, list[StageNode]]) -> set[str]:
    """Stages used by more than one pipeline (charged in full to each, and marked shared)."""
    seen: dict[str, int] = {}
    for stages in plans.values():
        for stage in stages:
            seen[stage.key] = seen.get(stage.key, 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _stage(
    exp: ExperimentConfig,
    name: str,
    phase: PhaseConfig,
    *,
    data: DataSpec | None = None,
    moe: MoEConfig | None = None,
    trainable: tuple[str, ...] = ("all",),
    moe_model: bool | None = None,
) -> StageConfig:
    """One stage's config; `data` defaults to the phase's; `moe_model` says whether the trained model has
    experts (default: whether `moe` is set)."""
    data = data or phase.data
    if data is None:
        raise ConfigError(f"experiment: stage {name} has no data")
    data = exp.data.resolve(data)
    is_moe = moe is not None if moe_model is None else moe_model
    scaling = exp.moe_scaling if (is_moe and exp.moe_scaling is not None) else exp.scaling
    layers = exp.moe.layers
    return StageConfig(
        name=name,
        task=phase.task,
        head=phase.head,
        model=ModelConfig(
            arch=exp.arch,
            kwargs=dict(exp.model_kwargs),
            moe=moe,
            moe_layers=layers if isinstance(layers, str) else list(layers),
        ),
        trainable=trainable,
        optim=phase.optim,
        budget=phase.budget,
        batch_size=phase.batch_size or exp.batch_size,
        scaling=scaling,
        storage=f"{exp.storage.rstrip('/')}/{exp.name}",
        data=data,
        s3=exp.s3,
        seed=exp.seed,
        evaluate_at_start=phase.evaluate_at_start,
        checkpoint=phase.checkpoints,
        precision=phase.precision or exp.precision,
        compile=phase.compile,
        max_failures=exp.max_failures,
    )
