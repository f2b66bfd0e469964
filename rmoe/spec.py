"""A model's full recipe (architecture, its kwargs, which MLPs are MoE and how), serialisable as JSON.

Checkpoints carry it so any checkpoint rebuilds the exact module tree before its weights load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn

from rmoe.moe.config import MoEConfig
from rmoe.upcycle import InitMode, convert_layers

RMOE_PREFIX = "rmoe_"


@dataclass(frozen=True)
class ModelSpec:
    """`arch` is any timm model name (the registered `rmoe_*` ones are built dense here, then converted)."""

    arch: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    moe_layers: tuple[int, ...] = ()
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if not timm.is_model(self.arch):
            raise ValueError(f"arch: unknown timm model {self.arch!r}")
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if self.moe_layers and self.moe is None:
            raise ValueError("moe: a spec with moe_layers needs an MoE config")
        for key in ("pretrained", "num_experts", "moe_layers", "moe_config"):
            if key in self.model_kwargs:
                raise ValueError(f"model_kwargs: {key!r} is not a model kwarg here; set it on the spec")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def dense(self) -> ModelSpec:
        return ModelSpec(self.arch, dict(self.model_kwargs))

    def with_moe(self, layers: tuple[int, ...] | list[int], moe: MoEConfig) -> ModelSpec:
        return ModelSpec(self.arch, dict(self.model_kwargs), tuple(layers), moe)

    def with_kwargs(self, **changes: Any) -> ModelSpec:
        """The same spec with some model kwargs changed (a new head's `num_classes`, a task's `img_size`)."""
        return ModelSpec(self.arch, {**self.model_kwargs, **changes}, self.moe_layers, self.moe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "model_kwargs": dict(self.model_kwargs),
            "moe_layers": list(self.moe_layers),
            "moe": None if self.moe is None else self.moe.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        unknown = sorted(set(data) - {"arch", "model_kwargs", "moe_layers", "moe"})
        if unknown:
            raise ValueError(f"unknown model spec field(s): {', '.join(unknown)}")
        moe = data.get("moe")
        return cls(
            arch=data["arch"],
            model_kwargs=dict(data.get("model_kwargs") or {}),
            moe_layers=tuple(data.get("moe_layers") or ()),
            moe=None if moe is None else MoEConfig.from_dict(moe),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))


def build_model(spec: ModelSpec, *, init: InitMode = "scratch", seed: int = 0) -> nn.Module:
    """Instantiate `spec` with fresh weights; `model.rmoe_spec` records it.

    init="scratch": independent experts unless the MoE config is residual (then the core is the dense
    init and residuals start at `init_noise`); init="upcycle": experts start from the dense MLPs.
    """
    extra = {"num_experts": 0} if spec.arch.startswith(RMOE_PREFIX) else {}
    model = timm.create_model(spec.arch, pretrained=False, **extra, **spec.model_kwargs)
    if spec.moe_layers:
        assert spec.moe is not None
        convert_layers(model, spec.moe_layers, spec.moe, init=init, seed=seed)
    model.rmoe_spec = spec
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "rmoe_spec", None)
    if not isinstance(spec, ModelSpec):
        raise ValueError("model has no rmoe_spec; build it with rmoe.build_model or timm.create_model('rmoe_...')")
    return spec
