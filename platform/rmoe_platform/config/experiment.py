"""An experiment: the paper's pipelines side by side, from one config (YAML presets under `configs/`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rmoe import MoEConfig
from rmoe_platform import storage
from rmoe_platform.config.fields import apply_override, check, from_dict, load_yaml
from rmoe_platform.config.stage import (
    BudgetConfig,
    CheckpointSpec,
    DataSpec,
    HeadConfig,
    OptimConfig,
    ScalingSpec,
    check_precision,
)
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
    precision: str | None = None  # this phase's training precision (default: the experiment's precision)
    compile: bool = False  # torch.compile the dense parts of this phase's models
    # checkpoint cadence (every_n_steps or every_n_epochs) and how many to keep: where an interrupted stage
    # resumes from; it does not change what a stage computes (nor its config hash)
    checkpoints: CheckpointSpec = field(default_factory=CheckpointSpec)

    def __post_init__(self) -> None:
        check(self.task in TASKS, f"task: unknown task {self.task!r} (use {', '.join(TASKS)})")
        check(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision is not None:
            check_precision(self.precision)
        check(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")


Phase = TypeVar("Phase", bound=PhaseConfig)


@dataclass(frozen=True)
class DeclaredCost:
    """What producing an imported core cost, as the user declares it (0 = sunk: paid before, or by
    someone else). `dollars` defaults to `gpu_days` at the experiment's GPU price; `flops` to 0 (unknown)."""

    gpu_days: float = 0.0
    dollars: float | None = None
    flops: float = 0.0

    def __post_init__(self) -> None:
        for name in ("gpu_days", "dollars", "flops"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, int | float) and math.isfinite(value) and value >= 0),
                f"{name} must be a finite number >= 0, got {value!r}",
            )


@dataclass(frozen=True)
class UpstreamPhaseConfig(PhaseConfig):
    """The upstream phase: trained (`data` + `budget`), or a pretrained dense core imported from
    `checkpoint` (a local path or s3:// URI of a safetensors or torch file, in timm's naming of the
    matching dense architecture, or a dense rmoe checkpoint) at a declared `cost`. With a checkpoint,
    `data` and `budget` serve only the pipelines that still train upstream (`moe`, and the intermediate
    stages of `rmoe_i` and `upcycle`, which train on upstream data)."""

    budget: BudgetConfig | None = None  # type: ignore[assignment]
    checkpoint: str | None = None
    cost: DeclaredCost | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.checkpoint is None or bool(self.checkpoint.strip()), "checkpoint must be a path or s3:// URI")
        check(
            self.checkpoint is not None or self.budget is not None,
            "budget is required (or set checkpoint to start from a pretrained dense core)",
        )
        check(
            self.cost is None or self.checkpoint is not None, "cost: a declared cost belongs to an imported checkpoint"
        )

    @property
    def imported(self) -> bool:
        return self.checkpoint is not None

    @property
    def declared_cost(self) -> DeclaredCost:
        return self.cost or DeclaredCost()


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
    upstream: UpstreamPhaseConfig = field(default_factory=lambda: UpstreamPhaseConfig(BudgetConfig(epochs=1)))
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
    # the device table's overrides (peaks, assumed MFU, price per device: `cost.devices`), e.g. {h100: {mfu: 0.5}}
    devices: dict[str, dict[str, float | str]] = field(default_factory=dict)
    seed: int = 0  # the seed of a single run (model init, MoE noise, shuffle order, augmentation draws)
    seeds: tuple[int, ...] = ()  # replicates: every pipeline once per seed, paired across pipelines by seed
    precision: str = "auto"  # every phase's training precision unless the phase sets its own (PRECISIONS)
    # worker-group restarts a stage may make when a Train worker dies (a node lost, an OOM kill): each
    # continues from the stage's newest checkpoint; 0: the stage fails, and a rerun resumes it
    max_failures: int = 0

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"name must be non-empty without '/', got {self.name!r}")
        check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        check_precision(self.precision)
        check(len(self.pipelines) > 0, "pipelines must name at least one pipeline")
        for pipeline in self.pipelines:
            check(pipeline in PIPELINES, f"pipelines: unknown pipeline {pipeline!r} (known: {', '.join(PIPELINES)})")
        self._check_upstream()
        check(self.downstream.data is not None, "downstream.data is required")
        for phase in ("upstream", "intermediate"):
            task = getattr(self, phase).task
            check(task == "classification", f"{phase}.task: upstream phases train classification, got {task!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        self._check_seeds()
        for kind, price in self.prices.items():
            check(price >= 0, f"prices.{kind} must be >= 0, got {price}")
        ep = (self.moe_scaling or self.scaling).expert_parallel_size
        check(
            self.moe.num_experts % ep == 0,
            f"moe.num_experts: {self.moe.num_experts} experts cannot be sharded over expert_parallel_size={ep}",
        )
        from rmoe_platform.cost.devices import device_table

        device_table(self.devices)  # raises on a bad override, naming the device and field
        for kind in {self.scaling.device_kind, (self.moe_scaling or self.scaling).device_kind}:
            check(kind in self.prices, f"prices: no price for device kind {kind!r}")

    def _check_seeds(self) -> None:
        check(isinstance(self.seeds, tuple), f"seeds must be a list of integers, got {self.seeds!r}")
        for name, values in (("seed", (self.seed,)), ("seeds", self.seeds)):
            for value in values:
                check(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"{name}: seeds are integers >= 0, got {value!r}",
                )
        check(len(set(self.seeds)) == len(self.seeds), f"seeds: each seed once, got {list(self.seeds)}")
        check(
            not self.seeds or self.seed == 0 or self.seed in self.seeds,
            f"seeds: seed={self.seed} is not among seeds {list(self.seeds)} (set one of the two)",
        )

    @property
    def replicate_seeds(self) -> tuple[int, ...]:
        """The seeds the pipelines run with: `seeds`, else the one `seed`."""
        return self.seeds or (self.seed,)

    def for_seed(self, seed: int) -> ExperimentConfig:
        """This experiment's single run with `seed` (one replicate)."""
        return dataclasses.replace(self, seed=seed, seeds=())

    def _check_upstream(self) -> None:
        """What the pipelines need of the upstream phase: a trained upstream needs data; `moe` always
        trains upstream (from scratch); `rmoe_i`/`upcycle` train their intermediate stage on upstream data."""
        up = self.upstream
        if not up.imported:
            check(up.data is not None, "upstream.data is required (or set upstream.checkpoint to a pretrained core)")
            return
        if "moe" in self.pipelines:
            check(
                up.data is not None and up.budget is not None,
                "pipelines: moe trains its MoE from scratch upstream and needs upstream.data and upstream.budget "
                "(the imported upstream.checkpoint serves dense, rmoe_i, rmoe_d and upcycle only)",
            )
        for pipeline in ("rmoe_i", "upcycle"):
            check(
                pipeline not in self.pipelines or self.intermediate_data is not None,
                f"pipelines: {pipeline}'s intermediate stage trains on upstream data: set upstream.data "
                "(or intermediate.data)",
            )
        cost = up.declared_cost
        check(
            cost.dollars is not None or cost.gpu_days == 0 or "gpu" in self.prices,
            "upstream.cost: gpu_days declared but prices has no gpu price (set prices.gpu or upstream.cost.dollars)",
        )

    @property
    def intermediate_data(self) -> DataSpec | None:
        """The data of the intermediate stages (RMoE-I residual, upcycling): `intermediate.data`, else the
        upstream data."""
        return self.intermediate.data or self.upstream.data

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

        def phase(config: Phase) -> Phase:
            if config.data is None or not local_path(config.data.uri):
                return config
            return dataclasses.replace(
                config, data=dataclasses.replace(config.data, uri=storage.normalize(config.data.uri))
            )

        checkpoint = self.upstream.checkpoint
        if checkpoint is not None and not storage.is_remote(checkpoint):
            upstream = dataclasses.replace(phase(self.upstream), checkpoint=storage.normalize(checkpoint))
        else:
            upstream = phase(self.upstream)
        return dataclasses.replace(
            self,
            storage=storage.normalize(self.storage),
            results=storage.normalize(self.results),
            data=DataRoot(storage.normalize(self.data.uri)),
            upstream=upstream,
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
