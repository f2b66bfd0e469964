"""Typed configuration of one training stage, validated on construction and loadable from YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm

import rmoe  # noqa: F401  (registers the rmoe_* timm models)
from rmoe import ModelSpec, MoEConfig
from rmoe_platform.config.fields import ConfigError, check, from_dict, load_yaml
from rmoe_platform.datasets.scenes import SceneRecipe
from rmoe_platform.datasets.transforms import AugmentSpec
from rmoe_platform.names import TASKS
from rmoe_platform.storage.s3 import S3Options

if TYPE_CHECKING:
    from ray.train import ScalingConfig

TRAINABLE_GROUPS = ("all", "residual", "router", "experts", "core", "moe", "head", "non_moe")
NORMS = ("BN", "SyncBN", "GN", "none")
# Training precision: `auto` is bf16 autocast on CUDA devices that support it and fp32 elsewhere; `fp16`
# trains with a gradient scaler. Master weights, the router and checkpoints stay fp32 in every mode.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check_precision(value: object) -> None:
    check(value in PRECISIONS, f"precision: unknown {value!r} (use {', '.join(PRECISIONS)})")


@dataclass(frozen=True)
class ModelConfig:
    """The model: a timm architecture (+ MoE), or the parent stage's checkpoint (+ an upcycling spec).

    With `parent_checkpoint`, the parent's model is loaded; if it is dense and `moe` is set, its MLPs at
    `moe_layers` are upcycled (experts = core + noise). `num_classes` swaps the classifier head
    (a downstream label set).
    """

    arch: str = "rmoe_vit_nano_patch4_32"
    kwargs: dict[str, Any] = field(default_factory=dict)
    moe: MoEConfig | None = None
    moe_layers: str | list[int] = "every_other"
    parent_checkpoint: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        check(timm.is_model(self.arch), f"arch: unknown timm model {self.arch!r}")
        check(self.moe is None or isinstance(self.moe, MoEConfig), f"moe: expected an MoEConfig, got {self.moe!r}")
        check(self.num_classes is None or self.num_classes > 0, "num_classes must be > 0")
        for key in ("pretrained", "num_experts", "moe_layers", "num_classes"):
            check(key not in self.kwargs, f"kwargs.{key}: set it as a model field, not a kwarg")

    def base_spec(self) -> ModelSpec:
        return ModelSpec(self.arch, dict(self.kwargs))


SCHEDULES = ("cosine", "poly", "step")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warmup, then a decay (`schedule`); router and residual groups may have their own LR.

    The schedules are mmengine's, step for step (a test compares the curves):
    - `cosine`: `CosineAnnealingLR` after the warmup, down to `min_lr_ratio` × lr at the last step;
    - `poly`: `PolyLR` after the warmup, (1 − progress)^`power` down to `min_lr_ratio` × lr (mmseg's);
    - `step`: `MultiStepLR`, lr × `gamma` at each of `milestones` (mmdet's), counted in the stage budget's
      unit (epochs for an epoch budget, steps for a step budget).

    The warmup is mmengine's `LinearLR` from `warmup_start_factor` × lr over `warmup_steps`; without
    `warmup_start_factor` it is the platform's original ramp, (step + 1) / warmup_steps.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    router_lr: float | None = None
    residual_lr: float | None = None
    grad_clip: float | None = 1.0
    schedule: str = "cosine"
    power: float = 1.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_start_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "router_lr", "residual_lr"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{name} must be > 0, got {value}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        check(self.schedule in SCHEDULES, f"schedule: unknown {self.schedule!r} (use {', '.join(SCHEDULES)})")
        check(self.power > 0, f"power must be > 0, got {self.power}")
        check(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        increasing = list(self.milestones) == sorted(set(self.milestones))
        check(
            all(isinstance(m, int) and m > 0 for m in self.milestones) and increasing,
            f"milestones must be increasing positive ints, got {list(self.milestones)}",
        )
        check(self.schedule == "step" or not self.milestones, "milestones belong to schedule: step")
        check(self.schedule != "step" or bool(self.milestones), "schedule: step needs milestones")
        factor = self.warmup_start_factor
        check(factor is None or 0 < factor <= 1, f"warmup_start_factor must be in (0, 1], got {factor}")


@dataclass(frozen=True)
class BudgetConfig:
    """Exactly one of `epochs` or `steps` (optimizer steps)."""

    epochs: int | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        check((self.epochs is None) != (self.steps is None), "set exactly one of epochs or steps")
        value = self.epochs if self.epochs is not None else self.steps
        check(isinstance(value, int) and value > 0, f"budget must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ScalingSpec:
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        check(
            self.expert_parallel_size >= 1 and self.num_workers % self.expert_parallel_size == 0,
            f"expert_parallel_size ({self.expert_parallel_size}) must divide num_workers ({self.num_workers})",
        )

    @property
    def device_kind(self) -> str:
        return "gpu" if self.use_gpu else "cpu"

    @property
    def cpus_per_worker(self) -> float:
        """Ray Train's reservation per worker: `resources_per_worker.CPU`, else 1 CPU (none on GPU workers)."""
        return float((self.resources_per_worker or {}).get("CPU", 0 if self.use_gpu else 1))

    @property
    def gpus_per_worker(self) -> float:
        """`resources_per_worker.GPU`, else 1 GPU on GPU workers; 0 on CPU workers."""
        return float((self.resources_per_worker or {}).get("GPU", 1)) if self.use_gpu else 0.0

    @property
    def total_cpus(self) -> float:
        return self.cpus_per_worker * self.num_workers

    @property
    def total_gpus(self) -> float:
        return self.gpus_per_worker * self.num_workers

    def ray_scaling_config(self) -> ScalingConfig:
        """The Ray Train `ScalingConfig` of these workers."""
        from ray.train import ScalingConfig

        return ScalingConfig(
            num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=self.resources_per_worker
        )


@dataclass(frozen=True)
class CheckpointSpec:
    every_n_steps: int | None = None
    every_n_epochs: int | None = 1
    keep: int = 2

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name} must be >= 1, got {value}")
        check(self.keep >= 1, f"keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class DataSpec:
    """A dataset in the shard format at `uri` (a local folder or s3://bucket/prefix).

    With `generate`, a procedural dataset is written there first if none exists (and an existing one
    must come from the same recipe). `img_size` is the model input side (default: the model's own);
    `shuffle_buffer` is in rows per worker (default: 8 local batches); undecodable rows are skipped
    and counted until they pass `max_bad_fraction` of a split, which fails the run.
    """

    uri: str = ""
    generate: SceneRecipe | None = None
    img_size: int | None = None
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    max_bad_fraction: float = 0.001
    shuffle_buffer: int | None = None

    def __post_init__(self) -> None:
        check(bool(self.uri), "uri is required: a dataset folder or s3://bucket/prefix")
        check(self.img_size is None or self.img_size >= 8, f"img_size must be >= 8, got {self.img_size}")
        check(0 <= self.max_bad_fraction < 1, f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        check(self.shuffle_buffer is None or self.shuffle_buffer >= 0, "shuffle_buffer must be >= 0")


@dataclass(frozen=True)
class HeadConfig:
    """The OpenMMLab head of a segmentation (UperNet + FCN auxiliary head) or detection (FPN + Mask R-CNN)
    stage. Defaults are the papers' sizes; the CPU demo shrinks them.

    `channels`: UperNet's decode width, or FPN's and the RoI heads' width; `fc_channels`: Mask R-CNN's box
    head FC width; `norm`: the normalisation of UperNet's heads, or of Mask R-CNN's FPN and mask head
    (`none`: mmdet's published Mask R-CNN; SyncBN computes batch statistics over all workers, which needs
    GPU workers: on CPU workers it falls back to BN, statistics per worker); `aux_weight`: UperNet's FCN
    auxiliary loss weight (0 = no auxiliary head); `pyramid_channels`: a ViT's simple-pyramid width
    (default embed_dim); `anchor_scales`: RPN anchor sizes as multiples of each level's stride;
    `rpn_proposals`/`roi_samples`: proposals kept per image and RoIs sampled for the box head in
    training; `max_per_img`/`score_thr`: detections kept at test time.
    """

    channels: int = 512
    fc_channels: int = 1024
    norm: str = "BN"
    aux_weight: float = 0.4
    pyramid_channels: int | None = None
    anchor_scales: tuple[int, ...] = (8,)
    rpn_proposals: int = 1000
    roi_samples: int = 512
    max_per_img: int = 100
    score_thr: float = 0.05

    def __post_init__(self) -> None:
        for name in ("channels", "fc_channels", "rpn_proposals", "roi_samples", "max_per_img"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        check(self.norm in NORMS, f"norm: unknown {self.norm!r} (use {', '.join(NORMS)})")
        check(self.aux_weight >= 0, f"aux_weight must be >= 0, got {self.aux_weight}")
        check(self.pyramid_channels is None or self.pyramid_channels >= 1, "pyramid_channels must be >= 1")
        check(len(self.anchor_scales) >= 1 and all(s > 0 for s in self.anchor_scales), "anchor_scales must be > 0")
        check(0 <= self.score_thr < 1, f"score_thr must be in [0, 1), got {self.score_thr}")

    def on_workers(self, use_gpu: bool) -> HeadConfig:
        """The head as built on the stage's workers: torch's SyncBatchNorm refuses CPU tensors, so SyncBN
        falls back to BN on CPU workers (one GPU worker keeps SyncBN, which then syncs with itself)."""
        return dataclasses.replace(self, norm="BN") if self.norm == "SyncBN" and not use_gpu else self


@dataclass(frozen=True)
class FaultInjection:
    """Test-only: worker `rank` exits at `step` once (the `marker` file records that it happened)."""

    step: int
    marker: str
    rank: int = 0


@dataclass(frozen=True)
class StageConfig:
    """One training stage. `task` is what it trains: classification (a timm model), or segmentation /
    detection (an mmseg UperNet / mmdet Mask R-CNN on the model as backbone, shaped by `head`)."""

    name: str
    task: str = "classification"
    head: HeadConfig = field(default_factory=HeadConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: tuple[str, ...] = ("all",)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(epochs=1))
    batch_size: int = 64
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    storage: str = "./runs"
    data: DataSpec = field(default_factory=DataSpec)
    s3: S3Options = field(default_factory=S3Options)
    seed: int = 0
    log_every: int = 10
    max_failures: int = 0
    evaluate_at_start: bool = False  # validate before the first step too (reported as initial/val_*)
    precision: str = "auto"  # one of PRECISIONS
    compile: bool = False  # torch.compile the model's dense parts (attention, dense MLPs)
    fault_injection: FaultInjection | None = None

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"name must be a non-empty name without '/', got {self.name!r}")
        check(self.task in TASKS, f"task: unknown task {self.task!r} (use {', '.join(TASKS)})")
        check(len(self.trainable) > 0, "trainable must name at least one group")
        for group in self.trainable:
            check(
                group in TRAINABLE_GROUPS or group.startswith("re:"),
                f"trainable: unknown group {group!r} (use {', '.join(TRAINABLE_GROUPS)} or 're:<regex>')",
            )
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(
            self.batch_size % self.scaling.num_workers == 0,
            f"batch_size ({self.batch_size}) must be divisible by scaling.num_workers ({self.scaling.num_workers})",
        )
        check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        check(bool(self.storage), "storage must be a local path or s3://bucket/prefix")
        check_precision(self.precision)
        check(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")

    @property
    def computes_in_fp32(self) -> bool:
        """Whether the stage's arithmetic is fp32 whatever device it lands on (`auto` on CPU workers)."""
        return self.precision == "fp32" or (self.precision == "auto" and not self.scaling.use_gpu)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.scaling.num_workers

    def steps_per_epoch(self, num_train: int) -> int:
        """Optimizer steps in one pass over `num_train` rows (the dataset's train split)."""
        return num_train // self.batch_size

    def total_steps(self, num_train: int) -> int:
        if self.budget.steps is not None:
            return self.budget.steps
        assert self.budget.epochs is not None
        return self.budget.epochs * self.steps_per_epoch(num_train)

    def milestone_steps(self, num_train: int) -> tuple[int, ...]:
        """The `step` schedule's milestones in optimizer steps (given in the budget's unit)."""
        if self.budget.epochs is None:
            return self.optim.milestones
        return tuple(m * self.steps_per_epoch(num_train) for m in self.optim.milestones)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageConfig:
        return from_dict(cls, data, "stage")

    @classmethod
    def from_yaml(cls, path: str | Path) -> StageConfig:
        return cls.from_dict(load_yaml(path))


__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "BudgetConfig",
    "CheckpointSpec",
    "ConfigError",
    "DataSpec",
    "FaultInjection",
    "HeadConfig",
    "ModelConfig",
    "OptimConfig",
    "ScalingSpec",
    "StageConfig",
]
