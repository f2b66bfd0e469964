"""A pretrained dense model as the core θ⁰ of an RMoE model.

The file is a state dict in timm's naming of the matching dense architecture (`vit_tiny_patch16_224` for
`rmoe_vit_tiny_patch16_224`, see `rmoe.models.TIMM_DENSE_NAMES`), as safetensors or as a torch file loaded
with `weights_only=True`, or a dense rmoe checkpoint. It is loaded into the dense `rmoe_*` model key by key
(every key and shape must match), and its classifier is re-initialised when its class count differs from
the one the caller trains for: the rest of the function is kept exactly, so upcycling it with zero noise
gives the pretrained model's outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rmoe.checkpoint import load_state_dict_file, load_weights, read_metadata
from rmoe.models import TIMM_DENSE_NAMES
from rmoe.spec import ModelSpec, build_model

FORMATS = ("safetensors", "torch", "rmoe")  # a plain safetensors state dict, a torch file, an rmoe checkpoint


@dataclass(frozen=True)
class DenseCore:
    """The imported dense model (its `rmoe_spec` rebuilds it) and what the import found."""

    model: nn.Module
    file_format: str  # one of FORMATS
    file_classes: int  # the file's classifier outputs (0: the file has no classifier)
    head_reinitialized: bool

    @property
    def spec(self) -> ModelSpec:
        spec = self.model.rmoe_spec
        assert isinstance(spec, ModelSpec)
        return spec


def import_dense_core(
    path: str | os.PathLike[str], spec: ModelSpec, *, num_classes: int | None = None, seed: int = 0
) -> DenseCore:
    """Load the dense model of `spec` (its arch and kwargs; `num_classes` is taken from the file) from
    `path`; with `num_classes` set and different from the file's, the classifier is re-initialised
    (seeded by `seed`). Raises ValueError naming the file and the first keys that differ."""
    path = Path(path)
    if spec.is_moe:
        raise ValueError(f"core: {spec.arch} with MoE layers is not a dense architecture")
    dense = ModelSpec(spec.arch, {k: v for k, v in spec.model_kwargs.items() if k != "num_classes"})
    state = load_state_dict_file(path)
    file_format = _check_own_spec(path, dense)
    file_classes = _file_classes(dense, state)
    model = build_model(dense.with_kwargs(num_classes=file_classes))
    persistent = set(model.state_dict())
    transient = {name for name, _ in model.named_buffers()} - persistent  # e.g. Swin's relative_position_index
    state = {k: v for k, v in state.items() if k not in transient}
    try:
        load_weights(model, state, source=f"checkpoint {str(path)!r}")
    except ValueError as err:
        raise ValueError(f"{err} (expected the dense {describe_arch(dense)})") from None
    reinit = num_classes is not None and num_classes != file_classes
    if reinit:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.reset_classifier(num_classes)
        model.rmoe_spec = dense.with_kwargs(num_classes=num_classes)
    return DenseCore(model, file_format, file_classes, reinit)


def describe_arch(spec: ModelSpec) -> str:
    """`rmoe_vit_tiny_patch16_224 (timm: vit_tiny_patch16_224)` with its kwargs, for messages."""
    timm_name = TIMM_DENSE_NAMES.get(spec.arch)
    named = f"{spec.arch} (timm: {timm_name})" if timm_name else spec.arch
    return f"{named} with kwargs {spec.model_kwargs}" if spec.model_kwargs else named


def _check_own_spec(path: Path, dense: ModelSpec) -> str:
    """An rmoe checkpoint names its model: it must be the dense model of `dense` (any class count)."""
    if path.suffix != ".safetensors":
        return "torch"
    meta = read_metadata(path)
    if "rmoe_spec" not in meta:
        return "safetensors"
    own = ModelSpec.from_json(meta["rmoe_spec"])
    if own.is_moe:
        raise ValueError(f"checkpoint {str(path)!r}: an MoE model (layers {list(own.moe_layers)}), not a dense core")
    own_kwargs = {k: v for k, v in own.model_kwargs.items() if k != "num_classes"}
    if own.arch != dense.arch or own_kwargs != dense.model_kwargs:
        raise ValueError(
            f"checkpoint {str(path)!r}: holds {describe_arch(ModelSpec(own.arch, own_kwargs))}, "
            f"not {describe_arch(dense)}"
        )
    return "rmoe"


def _file_classes(dense: ModelSpec, state: dict[str, torch.Tensor]) -> int:
    """The class count of the file's classifier (0 when the file has none), found where the model
    keeps its classifier (`head` for a ViT, `head.fc` for a Swin)."""
    with torch.device("meta"):
        probe = build_model(dense.with_kwargs(num_classes=1))
    classifier = probe.get_classifier()
    name = next(n for n, module in probe.named_modules() if module is classifier)
    weight = state.get(f"{name}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else 0
