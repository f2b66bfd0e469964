"""A sweep's config (YAML under `configs/sweeps/`): the experiment, the pipeline, the space and the search."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError, apply_override, check, from_dict, load_yaml
from rmoe_platform.names import PIPELINES
from rmoe_platform.sweep.space import SearchSpace, parse_space

SEARCH_ALGORITHMS = ("grid", "random", "optuna")
COSTS = ("dollars", "device_seconds", "gpu_days", "flops")


@dataclass(frozen=True)
class SearchSpec:
    """`grid` runs every combination (every parameter a grid); `random` samples `num_samples` settings
    (grids are crossed with them); `optuna` samples with Optuna's TPE (no grids). `seed` fixes sampling,
    so a resumed sweep proposes the same settings."""

    algorithm: str = "grid"
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check(
            self.algorithm in SEARCH_ALGORITHMS,
            f"algorithm: unknown {self.algorithm!r} (use {', '.join(SEARCH_ALGORITHMS)})",
        )
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")


@dataclass(frozen=True)
class SchedulerSpec:
    """ASHA over the downstream stage's validation metric, one rung unit per evaluation (every epoch).
    `type: none` runs every trial to the end."""

    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 100  # evaluations; only caps the rungs (a trial ends with its budget anyway)

    def __post_init__(self) -> None:
        check(self.type in ("asha", "none"), f"type: unknown scheduler {self.type!r} (use asha or none)")
        check(self.grace_period >= 1, f"grace_period must be >= 1, got {self.grace_period}")
        check(self.reduction_factor > 1, f"reduction_factor must be > 1, got {self.reduction_factor}")
        check(self.max_t > self.grace_period, f"max_t ({self.max_t}) must exceed grace_period ({self.grace_period})")


@dataclass(frozen=True)
class SweepConfig:
    """`experiment` is a preset (a path relative to the sweep file, or an inline mapping); each trial
    runs `pipeline` of it with one sampled setting of `space`. `cost` is the cost axis of the Pareto
    table; `max_concurrent_trials` defaults to what the cluster's resources fit."""

    name: str
    experiment: ExperimentConfig
    pipeline: str
    space: dict[str, Any]
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    cost: str = "dollars"
    max_concurrent_trials: int | None = None

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"name must be non-empty without '/', got {self.name!r}")
        check(self.pipeline in PIPELINES, f"pipeline: unknown {self.pipeline!r} (use {', '.join(PIPELINES)})")
        check(self.cost in COSTS, f"cost: unknown {self.cost!r} (use {', '.join(COSTS)})")
        check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            f"max_concurrent_trials must be >= 1, got {self.max_concurrent_trials}",
        )
        check(
            not self.experiment.upstream.imported,
            "experiment.upstream.checkpoint: sweeps train their own upstream stage; an imported core is not "
            "supported in a sweep yet (run the swept settings as experiments, or train the upstream)",
        )
        space = self.search_space()
        if self.search.algorithm == "grid":
            for param in space.params:
                check(param.distribution == "grid", f"space.{param.name}: grid search needs {{grid: [...]}} values")
        if self.search.algorithm == "optuna":
            for param in space.params:
                check(param.distribution != "grid", f"space.{param.name}: optuna samples; use choice instead of grid")

    def search_space(self) -> SearchSpace:
        return parse_space(self.space, self.pipeline)

    @property
    def base_experiment(self) -> ExperimentConfig:
        """The experiment with only the swept pipeline."""
        return dataclasses.replace(self.experiment, pipelines=(self.pipeline,))

    def fingerprint(self) -> str:
        """What defines the sweep's trials (not where it runs): a resumed sweep must match it."""
        data = self.to_dict()
        data.pop("max_concurrent_trials")
        for key in ("storage", "results", "s3"):
            data["experiment"].pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
        """The sweep file, its `experiment` preset read in (relative to the sweep file), then `key=value`
        overrides (`experiment.data.uri=s3://…`, `search.num_samples=8`)."""
        path = Path(path)
        data = load_yaml(path)
        experiment = data.get("experiment")
        if isinstance(experiment, str):
            preset = (path.parent / experiment).resolve()
            if not preset.is_file():
                raise ConfigError(f"sweep.experiment: no such preset {experiment!r} (relative to {path})")
            data["experiment"] = load_yaml(preset)
        elif experiment is not None and not isinstance(experiment, dict):
            raise ConfigError("sweep.experiment: expected a preset path or a mapping")
        for override in overrides or []:
            apply_override(data, override)
        sweep = from_dict(cls, data, "sweep")
        # trials run in Tune's per-trial working directories: relative paths must not follow them there
        return dataclasses.replace(sweep, experiment=sweep.experiment.with_absolute_paths())
