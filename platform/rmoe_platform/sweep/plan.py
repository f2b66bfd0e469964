"""A checked sweep, before any trial starts: every setting the space can produce builds a valid
experiment, every parameter changes what the swept pipeline trains, and the stages no parameter touches
(the dense core) are known, so they are trained once and shared by all trials."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.pipelines.graph import StageNode, plan_pipelines
from rmoe_platform.storage.s3 import S3Access
from rmoe_platform.sweep.config import SweepConfig
from rmoe_platform.sweep.space import SearchSpace, apply_params

MAX_CHECKED_SETTINGS = 512  # settings checked up front; beyond it each parameter's values are still checked
DATA_CPUS_PER_TRIAL = 1.0  # for Ray Data's decode tasks beside a trial's Train workers
DRIVER_CPUS_PER_TRIAL = 1.0  # the trial function itself (it builds the TorchTrainer and waits on it)


SEED_PARAM = "seed"  # the Tune parameter of a replicated sweep: every setting runs once per experiment seed


@dataclass(frozen=True)
class TrialSpec:
    key: str  # stable id of the setting (and seed, in a replicated sweep) within the sweep
    params: dict[str, Any]  # the swept setting; the seed is not part of it (replicates share a setting)
    experiment: ExperimentConfig  # one seed's experiment


@dataclass(frozen=True)
class SweepPlan:
    """What trials need, shipped to them by `tune.with_parameters` (held in the object store, never in
    Tune's state files: `access` carries the resolved S3 credentials)."""

    sweep: SweepConfig
    sweep_id: str
    space: SearchSpace
    shared_stages: frozenset[str]
    upstream_samples: int  # samples the upstream stage trains on: a budget `fraction` is relative to it
    access: S3Access

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.sweep.base_experiment.replicate_seeds

    def param_space(self) -> dict[str, Any]:
        """Tune's space: the swept parameters and, when the experiment has several seeds, a grid over them
        (each setting's replicates are trials of their own, paired with the other settings by seed)."""
        space = self.space.param_space()
        if len(self.seeds) > 1:
            from ray import tune

            space[SEED_PARAM] = tune.grid_search(list(self.seeds))
        return space

    def trial(self, config: dict[str, Any]) -> TrialSpec:
        """The trial of one Tune config: its setting, its seed's experiment and its key."""
        params, seed = split_seed(config, self.seeds)
        base = self.sweep.base_experiment.for_seed(seed)
        data = apply_params(base.to_dict(), self.space, params, self.fraction_to_steps)
        return TrialSpec(trial_key(config, self.seeds), params, ExperimentConfig.from_dict(data))

    def fraction_to_steps(self, fraction: float) -> int:
        """Steps of the residual stage that train on `fraction` of the upstream stage's samples (about that
        fraction of its cost: a top-1 MoE costs a dense model's FLOPs per token)."""
        phase = "downstream" if self.sweep.pipeline == "rmoe_d" else "intermediate"
        exp = self.sweep.experiment
        batch = getattr(exp, phase).batch_size or exp.batch_size
        return max(1, round(fraction * self.upstream_samples / batch))


def split_seed(config: dict[str, Any], seeds: tuple[int, ...]) -> tuple[dict[str, Any], int]:
    """A Tune config as (the swept setting, the seed it runs with)."""
    params = {k: v for k, v in config.items() if k != SEED_PARAM}
    return params, int(config.get(SEED_PARAM, seeds[0]))


def trial_key(config: dict[str, Any], seeds: tuple[int, ...] = (0,)) -> str:
    """A trial's stable id: the setting's hash, and its seed when the sweep has several."""
    params, seed = split_seed(config, seeds)
    payload = json.dumps(params, sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{key}-s{seed}" if len(seeds) > 1 else key


def build_plan(sweep: SweepConfig, access: S3Access, upstream_train_rows: int) -> SweepPlan:
    """Check every representative setting (raises ConfigError naming the parameter) and find the stages
    shared by all of them."""
    space = sweep.search_space()
    base = sweep.base_experiment
    upstream = base.upstream
    upstream_batch = upstream.batch_size or base.batch_size
    if upstream.budget.steps is not None:
        upstream_samples = upstream.budget.steps * upstream_batch
    else:
        assert upstream.budget.epochs is not None
        upstream_samples = upstream.budget.epochs * (upstream_train_rows // upstream_batch) * upstream_batch
    draft = SweepPlan(sweep, sweep_id(sweep), space, frozenset(), upstream_samples, access)
    hashes_by_param: dict[str, dict[str, set[tuple[str, ...]]]] = {p.name: {} for p in space.params}
    common: dict[str, str] | None = None
    for params in representative_settings(space):
        trial = _checked_trial(draft, params)
        stages = plan_pipelines(trial.experiment)[sweep.pipeline]
        signature = tuple(node.config_hash for node in stages)
        for name, value in params.items():
            label = json.dumps(value, sort_keys=True, default=str)
            hashes_by_param[name].setdefault(label, set()).add(signature)
        common = _common_stages(common, stages)
    for name, by_value in hashes_by_param.items():
        if len(by_value) > 1 and _no_effect(by_value):
            raise ConfigError(
                f"sweep.space.{name}: changes nothing that pipeline {sweep.pipeline!r} trains: every value gives "
                f"the same stages (a setting the {sweep.pipeline} model does not use, or values that resolve alike)"
            )
    shared = frozenset(common or {})
    return SweepPlan(sweep, draft.sweep_id, space, shared, upstream_samples, access)


def sweep_id(sweep: SweepConfig) -> str:
    return sweep.name


def representative_settings(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the parameters' candidate values (bounds for ranges), or, past
    MAX_CHECKED_SETTINGS, each parameter's values with the others at their first value."""
    candidates = [p.candidates() for p in space.params]
    names = space.names
    if math.prod(len(c) for c in candidates) <= MAX_CHECKED_SETTINGS:
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*candidates)]
    first = {name: values[0] for name, values in zip(names, candidates, strict=True)}
    return [{**first, name: value} for name, values in zip(names, candidates, strict=True) for value in values]


def _checked_trial(plan: SweepPlan, params: dict[str, Any]) -> TrialSpec:
    try:
        return plan.trial(params)
    except ConfigError as err:
        setting = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in params.items())
        message = str(err).replace("experiment.", "sweep.experiment.", 1)
        raise ConfigError(f"sweep.space: setting {{{setting}}} is invalid: {message}") from None


def _common_stages(common: dict[str, str] | None, stages: list[StageNode]) -> dict[str, str]:
    """Stage keys whose content hash is the same in every setting seen so far."""
    current = {node.key: node.config_hash for node in stages}
    if common is None:
        return current
    return {key: h for key, h in common.items() if current.get(key) == h}


def _no_effect(by_value: dict[str, set[tuple[str, ...]]]) -> bool:
    """True when changing only this parameter never changed the stages: in settings that differ only in
    it, the stage hashes coincide; approximated by every value producing the same set of signatures."""
    signatures = list(by_value.values())
    return all(s == signatures[0] for s in signatures[1:])
