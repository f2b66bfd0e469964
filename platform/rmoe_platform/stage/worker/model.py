"""The model a stage trains: fresh from its config, from the parent stage's checkpoint (upcycled when
the stage asks for experts on a dense parent), or resumed from the stage's own checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from rmoe import ModelSpec, build_model, convert_layers, spec_of, upcycle
from rmoe.checkpoint import load_weights
from rmoe_platform.config.stage import StageConfig
from rmoe_platform.stage.worker.checkpoints import MODEL_FILE, checkpoint_spec, load_model_state


def model_dir(checkpoint: Path) -> Path:
    """Accept a checkpoint directory or its model file."""
    return checkpoint.parent if checkpoint.name == MODEL_FILE else checkpoint


def build_stage_model(
    config: StageConfig,
    *,
    parent: Path | None = None,
    resume: Path | None = None,
    load: bool = True,
) -> tuple[nn.Module, ModelSpec]:
    """The stage's model and the spec that rebuilds it. `load=False` skips reading weights (validation)."""
    if resume is not None:
        spec = checkpoint_spec(resume)
        model = build_model(spec)
        if load:
            load_weights(model, load_model_state(resume), source=f"checkpoint {resume}")
        return model, spec
    if parent is not None:
        model, spec = _from_parent(config, model_dir(parent), load)
    else:
        model, spec = _fresh(config)
    return _with_head(model, spec, config.model.num_classes)


def _fresh(config: StageConfig) -> tuple[nn.Module, ModelSpec]:
    spec = config.model.base_spec()
    if config.model.num_classes is not None:
        spec = spec.with_kwargs(num_classes=config.model.num_classes)
    model = build_model(spec, seed=config.seed)
    if config.model.moe is not None:
        convert_layers(model, config.model.moe_layers, config.model.moe, init="scratch", seed=config.seed)
    return model, spec_of(model)


def _from_parent(config: StageConfig, parent: Path, load: bool) -> tuple[nn.Module, ModelSpec]:
    if not (parent / MODEL_FILE).is_file():
        raise ValueError(f"model.parent_checkpoint: no {MODEL_FILE} in {str(parent)!r}")
    spec = checkpoint_spec(parent)
    model = build_model(spec)
    if load:
        load_weights(model, load_model_state(parent), source=f"parent checkpoint {parent}")
    if config.model.moe is not None and not spec.is_moe:
        upcycle(model, config.model.moe_layers, config.model.moe, seed=config.seed)
    return model, spec_of(model)


def _with_head(model: nn.Module, spec: ModelSpec, num_classes: int | None) -> tuple[nn.Module, ModelSpec]:
    """Swap the classifier for a new label set (a downstream task)."""
    if num_classes is None or num_classes == getattr(model, "num_classes", None):
        return model, spec
    model.reset_classifier(num_classes)
    model.rmoe_spec = spec.with_kwargs(num_classes=num_classes)
    return model, model.rmoe_spec
