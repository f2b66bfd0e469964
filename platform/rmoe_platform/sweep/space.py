"""A sweep's search space: named parameters, each a distribution, mapped onto experiment config fields.

A parameter is an alias (`num_experts`, `residual_budget`, …) or a dotted experiment field
(`moe.top_k`, `downstream.optim.lr`). Aliases that name "the residual stage" resolve per pipeline: the
intermediate stage of rmoe_i / upcycle, the downstream stage of rmoe_d.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune

from rmoe_platform.config.fields import ConfigError, set_path

ALIASES = {
    "num_experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "capacity_factor": "moe.capacity_factor",
    "aux_weight": "moe.importance_loss",
    "residual_rank": "moe.residual_rank",
    "init_noise": "moe.init_noise",
    "moe_layers": "moe.layers",
    "upstream_lr": "upstream.optim.lr",
    "downstream_lr": "downstream.optim.lr",
}
RESIDUAL_ALIASES = {"residual_budget": "budget", "residual_lr": "optim.lr"}
RESIDUAL_PHASE = {"rmoe_i": "intermediate", "upcycle": "intermediate", "rmoe_d": "downstream"}
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
BUDGET_KEYS = ("steps", "epochs", "fraction")


@dataclass(frozen=True)
class Param:
    """One swept parameter: `name` as written in the sweep file, `path` the experiment field it sets."""

    name: str
    path: str
    distribution: str
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform/randint: (low, high), both inclusive

    @property
    def is_budget(self) -> bool:
        return self.name == "residual_budget"

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        if self.distribution == "grid":
            return tune.grid_search(list(self.values))
        if self.distribution == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.distribution == "uniform":
            return tune.uniform(low, high)
        if self.distribution == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive

    def candidates(self) -> list[Any]:
        """Values that stand for the whole range when checking the space: every listed value, or the bounds."""
        return list(self.values)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def param_space(self) -> dict[str, Any]:
        return {p.name: p.domain() for p in self.params}

    def budget_param(self) -> Param | None:
        return next((p for p in self.params if p.is_budget), None)


def parse_space(raw: Any, pipeline: str) -> SearchSpace:
    """Check the space's shape and resolve each name to an experiment field; errors name `space.<param>`."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            "sweep.space: empty search space; name at least one parameter, e.g. num_experts: {grid: [2, 4]}"
        )
    params = []
    for name, spec in raw.items():
        where = f"sweep.space.{name}"
        path = _resolve_path(str(name), pipeline, where)
        distribution, values = _distribution(spec, where)
        param = Param(str(name), path, distribution, values)
        if param.is_budget:
            _check_budget_values(param, where)
        params.append(param)
    return SearchSpace(tuple(params))


def _resolve_path(name: str, pipeline: str, where: str) -> str:
    if name in ALIASES:
        return ALIASES[name]
    if name in RESIDUAL_ALIASES:
        phase = RESIDUAL_PHASE.get(pipeline)
        if phase is None:
            raise ConfigError(f"{where}: pipeline {pipeline!r} has no residual stage (use rmoe_i, rmoe_d or upcycle)")
        return f"{phase}.{RESIDUAL_ALIASES[name]}"
    if "." in name:
        return name
    known = ", ".join(sorted([*ALIASES, *RESIDUAL_ALIASES]))
    raise ConfigError(f"{where}: unknown parameter {name!r} (known: {known}; or a dotted experiment field)")


def _distribution(spec: Any, where: str) -> tuple[str, tuple[Any, ...]]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{d}: …' for d in DISTRIBUTIONS)}}}, got {spec!r}")
    distribution, values = next(iter(spec.items()))
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {distribution!r} (use {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{distribution}: expected a non-empty list, got {values!r}")
    if distribution in ("grid", "choice"):
        return distribution, tuple(values)
    if len(values) != 2 or not all(_is_number(v) for v in values) or not values[0] < values[1]:
        raise ConfigError(f"{where}.{distribution}: expected [low, high] numbers with low < high, got {values!r}")
    if distribution == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{where}.loguniform: the low bound must be > 0, got {values[0]}")
    if distribution == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}.randint: bounds must be integers, got {values!r}")
    return distribution, tuple(values)


def _check_budget_values(param: Param, where: str) -> None:
    if param.distribution in ("uniform", "loguniform"):
        raise ConfigError(f"{where}: a budget is whole steps: use grid, choice or randint")
    for value in param.candidates():
        budget_mapping(value, f"{where}.{param.distribution}")


def budget_mapping(value: Any, where: str) -> dict[str, Any]:
    """A residual budget as written ({steps: n}, {epochs: n}, {fraction: f} or a bare step count)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: a budget must be steps, {{steps|epochs|fraction: …}}, got {value!r}")
    if isinstance(value, int):
        value = {"steps": value}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in BUDGET_KEYS:
        raise ConfigError(
            f"{where}: a budget must be one of {{steps: n}}, {{epochs: n}}, {{fraction: f}}, got {value!r}"
        )
    key, amount = next(iter(value.items()))
    if not _is_number(amount) or amount <= 0 or (key != "fraction" and not isinstance(amount, int)):
        raise ConfigError(
            f"{where}: budget {key} must be a positive {'number' if key == 'fraction' else 'int'}, got {amount!r}"
        )
    return {key: amount}


def apply_params(
    base: dict[str, Any], space: SearchSpace, values: dict[str, Any], fraction_to_steps: Callable[[float], int]
) -> dict[str, Any]:
    """A copy of the experiment mapping `base` with the sampled `values` set; a budget fraction of the
    upstream stage becomes steps through `fraction_to_steps`."""
    data = copy.deepcopy(base)
    for param in space.params:
        if param.name not in values:
            raise ConfigError(f"sweep: trial config has no value for {param.name!r}")
        value = values[param.name]
        if param.is_budget:
            budget = budget_mapping(value, f"sweep.space.{param.name}")
            value = {"steps": fraction_to_steps(budget["fraction"])} if "fraction" in budget else budget
        set_path(data, param.path, value, f"sweep.space.{param.name}")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
