"""Cost projection: what each pipeline of an experiment would cost, before training and without Ray.

Each stage's training FLOPs are the analytic FLOPs of one training sample of its model (the same
`train_flops_per_sample` a run is charged with) × its planned samples (steps × global batch); its
device time is FLOPs ÷ (the device's peak in the stage's precision × the utilisation assumed, or measured
on an earlier run: `calibrate`). Shared stages are charged in full to every pipeline that uses them, as in
the measured comparison.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from rmoe import ModelSpec
from rmoe_platform import storage
from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import DataSpec, StageConfig
from rmoe_platform.cost.devices import DeviceSpec, device_named, device_table
from rmoe_platform.datasets.format import DataFacts
from rmoe_platform.datasets.ingest import load_card
from rmoe_platform.pipelines.accounting import Cost, declared_cost, stage_cost, total
from rmoe_platform.pipelines.graph import StageNode, plan_pipelines
from rmoe_platform.pipelines.imported import ImportedCore

# Public datasets the paper presets name (train split rows, classes), for sizing an epoch budget when the
# dataset itself is not at hand. The platform's own conversion keeps these counts.
KNOWN_DATASETS: Mapping[str, tuple[str, int, int]] = {
    "imagenet-1k": ("classification", 1_281_167, 1000),
    "ade20k": ("segmentation", 20_210, 150),
    "coco-2017": ("detection", 118_287, 80),
}


@dataclass(frozen=True)
class PlannedData:
    """What sizing a stage needs of its dataset, and where that came from."""

    task: str
    num_train: int
    num_classes: int
    source: str  # recipe | card | known

    @property
    def facts(self) -> DataFacts:
        return DataFacts((0.5,) * 3, (0.25,) * 3, tuple(f"class_{i}" for i in range(self.num_classes)))


@dataclass(frozen=True)
class StageEstimate:
    key: str
    kind: str
    config: StageConfig  # what the stage would train with (its budget and batch size set the samples)
    samples: int
    flops_per_sample: float
    precision: str
    mfu: float
    mfu_source: str  # assumed | measured
    cost: Cost


@dataclass(frozen=True)
class ExperimentEstimate:
    experiment: str
    device: str
    spec: DeviceSpec
    stages: dict[str, StageEstimate]
    pipelines: dict[str, list[str]]  # pipeline -> its stage keys, in order

    def pipeline_cost(self, pipeline: str) -> Cost:
        return total(self.stages[key].cost for key in self.pipelines[pipeline])


def estimate(
    exp: ExperimentConfig, device: str | None = None, measured_mfu: Mapping[str, float] | None = None
) -> ExperimentEstimate:
    """Project every stage of every pipeline of `exp` onto `device` (default: `h100` when the experiment
    runs on GPUs, else `cpu`). `measured_mfu`: utilisation measured per stage key (or "*" for any stage),
    replacing the device's assumed one."""
    table = device_table(exp.devices)
    name = device or default_device(exp)
    spec = device_named(table, name, "--device")
    plans = plan_pipelines(exp, _declared_core(exp) if exp.upstream.imported else None)
    sizes = {field: planned_data(data, field) for field, data in exp.datasets().items()}
    head_cache: dict[str, float] = {}
    flops_cache: dict[str, float] = {}
    stages: dict[str, StageEstimate] = {}
    for nodes in plans.values():
        for node in nodes:
            if node.key not in stages:
                stages[node.key] = _stage_estimate(exp, node, spec, sizes, head_cache, flops_cache, measured_mfu or {})
    return ExperimentEstimate(exp.name, name, spec, stages, {p: [n.key for n in nodes] for p, nodes in plans.items()})


def default_device(exp: ExperimentConfig) -> str:
    """What a projection assumes without `--device`: an H100 for an experiment on GPU workers, else CPU."""
    return "h100" if exp.scaling.use_gpu or (exp.moe_scaling or exp.scaling).use_gpu else "cpu"


def planned_data(spec: DataSpec, field: str) -> PlannedData:
    """A dataset's task, train rows and classes: from its recipe, else its card (local datasets only: the
    projection reaches no network), else the table of known public datasets."""
    if spec.generate is not None:
        recipe = spec.generate
        return PlannedData(recipe.task, recipe.num_train, recipe.num_classes, "recipe")
    if not storage.is_remote(spec.uri):
        card = load_card(spec.uri, None, f"{field}.uri")
        if card is not None:
            return PlannedData(card.task, card.split("train").num_rows, card.num_classes, "card")
    known = KNOWN_DATASETS.get(storage.normalize(spec.uri).rstrip("/").rsplit("/", 1)[-1])
    if known is None:
        raise ConfigError(
            f"{field}.uri: cannot size {spec.uri!r} for the estimate (no local dataset there, no `generate` recipe, "
            f"not one of {', '.join(KNOWN_DATASETS)}); give the phase a `budget.steps` or prepare the dataset locally"
        )
    return PlannedData(*known, "known")


def _stage_estimate(
    exp: ExperimentConfig,
    node: StageNode,
    device: DeviceSpec,
    sizes: Mapping[str, PlannedData],
    head_cache: dict[str, float],
    flops_cache: dict[str, float],
    measured: Mapping[str, float],
) -> StageEstimate:
    if node.imported is not None:  # charged what the user declares, as in a run
        return StageEstimate(node.key, node.kind, node.config, 0, 0.0, "-", 0.0, "declared", node.imported.cost)
    config = node.config
    data = sizes[_data_field(exp, node)]
    config = replace(config, model=replace(config.model, num_classes=config.model.num_classes or data.num_classes))
    samples = config.total_steps(data.num_train) * config.batch_size
    model_key = json.dumps(
        [
            config.task,
            config.head,
            config.data.img_size,
            config.trainable,
            {**config.to_dict()["model"], "parent_checkpoint": None},
        ],
        sort_keys=True,
        default=str,
    )
    if model_key not in flops_cache:  # stages of one model (e.g. the MoE pipelines' downstream) are built once
        flops_cache[model_key] = planned_flops_per_sample(config, data.facts, head_cache)
    per_sample = flops_cache[model_key]
    precision = _precision(config.precision, device)
    mfu = measured.get(node.key, measured.get("*"))
    used = replace(device, mfu=mfu) if mfu is not None else device
    flops = per_sample * samples
    seconds = flops / (used.peak(precision) * used.mfu)
    cost = stage_cost(flops, seconds, device.kind, {device.kind: device.price(exp.prices)})
    source = "assumed" if mfu is None else "measured"
    return StageEstimate(node.key, node.kind, node.config, samples, per_sample, precision, used.mfu, source, cost)


def planned_flops_per_sample(config: StageConfig, facts: DataFacts, head_cache: dict[str, float]) -> float:
    """The stage's training FLOPs per sample as a run is charged them. The model is built on the meta device
    (shapes only, fast at any size) for the trunk's analytic FLOPs; a dense-prediction head is measured once
    per head, size and arch (`head_cache`) on a CPU model with a dense trunk (heads do not see the experts)."""
    from rmoe_platform.stage.prepare import build_sized_model  # the model a run builds and charges
    from rmoe_platform.tasks.dense import DenseTask

    with torch.device("meta"):
        sized, model, task, _ = build_sized_model(config, facts, parent=None)
    if not isinstance(task, DenseTask):
        return task.train_flops_per_sample(model, sized)
    size = sized.data.img_size
    assert size is not None
    key = json.dumps(
        [sized.task, sized.head, size, sized.model.arch, sized.model.kwargs, sized.model.num_classes],
        sort_keys=True,
        default=str,
    )
    if key not in head_cache:
        dense = replace(config, model=replace(config.model, moe=None), trainable=("all",))
        head_model = build_sized_model(dense, facts, parent=None).model
        head_cache[key] = task.head_forward_flops(head_model, size)
    return task.trunk_train_flops(model) + 3.0 * head_cache[key]


def _precision(precision: str, device: DeviceSpec) -> str:
    """The arithmetic a stage's precision setting gives on `device` (`auto`: bf16 on GPUs, fp32 on CPU)."""
    if precision == "auto":
        return "bf16" if device.kind == "gpu" else "fp32"
    return precision


def _data_field(exp: ExperimentConfig, node: StageNode) -> str:
    if node.kind in ("residual", "upcycle"):
        return "experiment.intermediate.data" if exp.intermediate.data is not None else "experiment.upstream.data"
    return "experiment.downstream.data" if node.kind == "downstream" else "experiment.upstream.data"


def _declared_core(exp: ExperimentConfig) -> ImportedCore:
    """The imported core as the projection sees it: the declared cost, the experiment's architecture (the
    file is not read: a projection reaches no storage)."""
    declared = exp.upstream.declared_cost
    cost = declared_cost(declared.gpu_days, declared.dollars, declared.flops, exp.prices)
    spec = ModelSpec(exp.arch, dict(exp.model_kwargs))
    uri = exp.upstream.checkpoint or ""
    return ImportedCore(uri, "not-read", "unknown", 0, spec, False, cost, exp.seed)


def measured_utilisation(rows: list[dict[str, Any]], device: str) -> dict[str, float]:
    """Model FLOP utilisation measured on `device` by the stage rows of a results store: per stage key (its
    newest run), and over all of them ("*": training FLOPs ÷ FLOPs the devices could have done)."""
    by_stage: dict[str, float] = {}
    flops = capacity = 0.0
    ordered = sorted(rows, key=lambda r: str(r.get("finished_at") or ""))
    for row in ordered:
        mfu = row.get("mfu")
        if row.get("row_type") != "stage" or row.get("device_model") != device or not mfu or not row.get("flops"):
            continue
        by_stage[str(row["stage"])] = float(mfu)
        flops += float(row["flops"])
        capacity += float(row["flops"]) / float(mfu)
    if capacity > 0:
        by_stage["*"] = flops / capacity
    return by_stage
