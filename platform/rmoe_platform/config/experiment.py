"""An experiment: the paper's pipelines side by side, from one config (YAML presets under `configs/`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmoe import MoEConfig
from rmoe_platform import storage
from rmoe_platform.config.fields import apply_override, check, from_dict, load_yaml
from rmoe_platform.config.stage import BudgetConfig, DataSpec, HeadConfig, OptimConfig, ScalingSpec
from rmoe_platform.names import METRIC_NAMES, PIPELINES, TASKS
from rmoe_platform.storage.s3 import S3Options


@dataclass(frozen=True)
class PhaseConfig:
    """Data, budget and optimizer of one phase (upstream, intermediate, downstream). Only downstream may
    be a dense-prediction `task` (segmentation: UperNet, detection: Mask R-CNN, shaped by `head`)."""

    budget: BudgetConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataSpec | None = None
    task: str = "classification"
    head: HeadConfig = field(default_factory=HeadConfig)
    evaluate_at_start: bool = False  # also validate before the first step (initial/val_* metrics)
    batch_size: int | None = None  # this phase's global batch (default: the experiment's batch_size)

    def __post_init__(self) -> None:
        check(self.task in TASKS, f"task: unknown task {self.task!r} (use {', '.join(TASKS)})")
        check(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class DataRoot:
    """Where the experiment's datasets live: a phase's `data.uri` that is a bare name (no '/', no
    scheme) is a dataset under this root, so `--set data.uri=s3://bucket/datasets` moves them all."""

    uri: str = "./runs/data"

    def resolve(self, spec: DataSpec) -> DataSpec:
        if "/" in spec.uri or "://" in spec.uri or spec.uri.startswith("~"):
            return spec
        return dataclasses.replace(spec, uri=f"{self.uri.rstrip('/')}/{spec.uri}")


@dataclass(frozen=True)
class MoESettings:
    """The MoE shared by the MoE pipelines; `layers` is a selection (every_other, last_<n>, '1,3', …)."""

    num_experts: int = 4
    top_k: int = 1
    layers: str | list[int] = "every_other"
    capacity_factor: float | None = None
    init_noise: float = 0.01
    residual_rank: int | None = None
    importance_loss: float = 0.01

    def __post_init__(self) -> None:
        self.config(residual=True)  # validates the combination

    def config(self, *, residual: bool, freeze_core: bool = True) -> MoEConfig:
        return MoEConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            init_noise=self.init_noise,
            residual=residual,
            residual_rank=self.residual_rank if residual else None,
            freeze_core=freeze_core,
            aux_weights={"importance": self.importance_loss},
        )


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    pipelines: tuple[str, ...] = PIPELINES
    arch: str = "rmoe_vit_nano_patch4_32"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    moe: MoESettings = field(default_factory=MoESettings)
    upstream: PhaseConfig = field(default_factory=lambda: PhaseConfig(BudgetConfig(epochs=1)))
    intermediate: PhaseConfig = field(default_factory=lambda: PhaseConfig(BudgetConfig(steps=20)))
    downstream: PhaseConfig = field(default_factory=lambda: PhaseConfig(BudgetConfig(epochs=1)))
    batch_size: int = 64
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    moe_scaling: ScalingSpec | None = None
    data: DataRoot = field(default_factory=DataRoot)
    storage: str = "./runs"
    results: str = "./runs/results"
    s3: S3Options = field(default_factory=S3Options)
    prices: dict[str, float] = field(default_factory=lambda: {"cpu": 0.05, "gpu": 2.5})
    seed: int = 0

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"name must be non-empty without '/', got {self.name!r}")
        check(len(self.pipelines) > 0, "pipelines must name at least one pipeline")
        for pipeline in self.pipelines:
            check(pipeline in PIPELINES, f"pipelines: unknown pipeline {pipeline!r} (known: {', '.join(PIPELINES)})")
        check(self.upstream.data is not None, "upstream.data is required")
        check(self.downstream.data is not None, "downstream.data is required")
        for phase in ("upstream", "intermediate"):
            task = getattr(self, phase).task
            check(task == "classification", f"{phase}.task: upstream phases train classification, got {task!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        for kind, price in self.prices.items():
            check(price >= 0, f"prices.{kind} must be >= 0, got {price}")
        ep = (self.moe_scaling or self.scaling).expert_parallel_size
        check(
            self.moe.num_experts % ep == 0,
            f"moe.num_experts: {self.moe.num_experts} experts cannot be sharded over expert_parallel_size={ep}",
        )
        for kind in {self.scaling.device_kind, (self.moe_scaling or self.scaling).device_kind}:
            check(kind in self.prices, f"prices: no price for device kind {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def metric_name(self) -> str:
        """The pipelines' metric: that of the downstream task."""
        return METRIC_NAMES[self.downstream.task]

    def with_absolute_paths(self) -> ExperimentConfig:
        """The same experiment with local paths made absolute against this process's working directory:
        for code that runs elsewhere (a Tune trial runs in a working directory of its own)."""

        def local_path(uri: str) -> bool:
            return not storage.is_remote(uri) and ("/" in uri or uri.startswith((".", "~")))

        def phase(config: PhaseConfig) -> PhaseConfig:
            if config.data is None or not local_path(config.data.uri):
                return config
            return dataclasses.replace(
                config, data=dataclasses.replace(config.data, uri=storage.normalize(config.data.uri))
            )

        return dataclasses.replace(
            self,
            storage=storage.normalize(self.storage),
            results=storage.normalize(self.results),
            data=DataRoot(storage.normalize(self.data.uri)),
            upstream=phase(self.upstream),
            intermediate=phase(self.intermediate),
            downstream=phase(self.downstream),
        )

    def datasets(self) -> dict[str, DataSpec]:
        """The phases' datasets, their uris resolved against `data.uri`, keyed by config field."""
        out = {}
        for phase in ("upstream", "intermediate", "downstream"):
            spec = getattr(self, phase).data
            if spec is not None:
                out[f"experiment.{phase}.data"] = self.data.resolve(spec)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return from_dict(cls, data, "experiment")

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
        """A preset (or {} when `path` is None) with `key.sub=value` overrides (values parsed as YAML)."""
        data = load_yaml(path) if path is not None else {}
        for override in overrides or []:
            apply_override(data, override)
        return cls.from_dict(data)
