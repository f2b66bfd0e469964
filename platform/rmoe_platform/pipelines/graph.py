"""The paper's pipelines as graphs of stages; shared stages are one node, identified by content hash.

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
from dataclasses import dataclass
from typing import Any

from rmoe_platform.config.stage import DataSpec, ModelConfig, StageConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.experiment import ExperimentConfig, PhaseConfig

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
    kind: str  # upstream_dense | upstream_moe | residual | upcycle | downstream
    config: StageConfig  # model.parent_checkpoint is filled in at run time from the parent's result
    parent: StageNode | None
    config_hash: str

    @property
    def lineage(self) -> list[StageNode]:
        chain, node = [], self
        while node is not None:
            chain.append(node)
            node = node.parent
        return chain[::-1]


def stage_hash(config: StageConfig, parent_hash: str | None) -> str:
    """Content hash of what the stage computes: its config (minus run-time fields) and its parent."""
    data = {k: v for k, v in config.to_dict().items() if k not in _HASH_EXCLUDED}
    data["model"] = {k: v for k, v in data["model"].items() if k != "parent_checkpoint"}
    payload = json.dumps({"stage": data, "parent": parent_hash}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_pipelines(exp: ExperimentConfig) -> dict[str, list[StageNode]]:
    """Each requested pipeline's stages in order; nodes shared between pipelines are the same object."""
    nodes: dict[str, StageNode] = {}

    def node(key: str, kind: str, config: StageConfig, parent: StageNode | None) -> StageNode:
        if key not in nodes:
            nodes[key] = StageNode(key, kind, config, parent, stage_hash(config, parent and parent.config_hash))
        return nodes[key]

    def dense_upstream() -> StageNode:
        return node("upstream_dense", "upstream_dense", _stage(exp, "upstream_dense", exp.upstream), None)

    def downstream(pipeline: str, parent: StageNode, moe: dict[str, Any] | None) -> StageNode:
        config = _stage(exp, f"{pipeline}-downstream", exp.downstream, moe=moe, moe_model=pipeline != "dense")
        return node(f"{pipeline}/downstream", "downstream", config, parent)

    plans: dict[str, list[StageNode]] = {}
    for pipeline in exp.pipelines:
        if pipeline == "dense":
            last = downstream("dense", dense_upstream(), None)
        elif pipeline == "moe":
            upstream = node(
                "upstream_moe",
                "upstream_moe",
                _stage(exp, "upstream_moe", exp.upstream, moe=_moe(exp, residual=False)),
                None,
            )
            last = downstream("moe", upstream, None)
        elif pipeline == "rmoe_i":
            residual = node(
                "rmoe_i/residual",
                "residual",
                _stage(
                    exp,
                    "rmoe_i-residual",
                    exp.intermediate,
                    data=exp.upstream.data,
                    moe=_moe(exp, residual=True),
                    trainable=("residual", "router"),
                ),
                dense_upstream(),
            )
            last = downstream("rmoe_i", residual, None)
        elif pipeline == "rmoe_d":
            last = downstream("rmoe_d", dense_upstream(), _moe(exp, residual=True))
        else:  # upcycle
            copies = node(
                "upcycle/intermediate",
                "upcycle",
                _stage(
                    exp, "upcycle-intermediate", exp.intermediate, data=exp.upstream.data, moe=_moe(exp, residual=False)
                ),
                dense_upstream(),
            )
            last = downstream("upcycle", copies, None)
        plans[pipeline] = last.lineage
    return plans


def shared_keys(plans: dict[str, list[StageNode]]) -> set[str]:
    """Stages used by more than one pipeline (charged in full to each, and marked shared)."""
    seen: dict[str, int] = {}
    for stages in plans.values():
        for stage in stages:
            seen[stage.key] = seen.get(stage.key, 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _moe(exp: ExperimentConfig, *, residual: bool) -> dict[str, Any]:
    return exp.moe.config(residual=residual).to_dict()


def _stage(
    exp: ExperimentConfig,
    name: str,
    phase: PhaseConfig,
    *,
    data: DataSpec | None = None,
    moe: dict[str, Any] | None = None,
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
    )
