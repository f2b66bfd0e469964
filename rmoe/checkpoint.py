"""Model checkpoints as safetensors (no pickled weights), carrying the `ModelSpec` that rebuilds them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rmoe.moe.config import MoEConfig
from rmoe.spec import ModelSpec, build_model, spec_of
from rmoe.upcycle import LayerSpec, upcycle

CHECKPOINT_FORMAT = "rmoe-safetensors-v1"


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    spec: ModelSpec | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the model's weights and spec atomically (a temp file renamed into place)."""
    return save_state_dict(model.state_dict(), path, spec=spec or spec_of(model), metadata=metadata)


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    spec: ModelSpec | None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors (and the spec that rebuilds their model, if given) atomically as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    meta = {**(metadata or {}), "format": CHECKPOINT_FORMAT}
    if spec is not None:
        meta["rmoe_spec"] = spec.to_json()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a torch state-dict file loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {str(path)!r} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load `state` strictly; a mismatch raises a ValueError listing what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:8])}{' …' if len(items) > 8 else ''}")
        raise ValueError(f"{source}: mismatched checkpoint ({'; '.join(parts)})")
    model.load_state_dict(dict(state), strict=True)


def load_model(path: str | os.PathLike[str], *, spec: ModelSpec | None = None) -> nn.Module:
    """Rebuild the model a checkpoint was saved from (its embedded spec, or `spec`) and load it."""
    if spec is None:
        meta = read_metadata(path) if str(path).endswith(".safetensors") else {}
        if "rmoe_spec" not in meta:
            raise ValueError(f"checkpoint: {str(path)!r} carries no rmoe_spec; pass spec=")
        spec = ModelSpec.from_json(meta["rmoe_spec"])
    model = build_model(spec)
    load_weights(model, load_state_dict_file(path), source=f"checkpoint {str(path)!r}")
    return model


def upcycle_checkpoint(
    path: str | os.PathLike[str],
    layers: LayerSpec,
    config: MoEConfig,
    *,
    spec: ModelSpec | None = None,
    seed: int = 0,
) -> nn.Module:
    """Load a dense checkpoint (ours, or a timm state dict with `spec`) and upcycle its MLPs."""
    model = load_model(path, spec=spec)
    dense_spec = spec_of(model)
    if dense_spec.is_moe:
        raise ValueError(f"checkpoint: {str(path)!r} is already an MoE model (layers {list(dense_spec.moe_layers)})")
    upcycle(model, layers, config, seed=seed)  # records the MoE in model.rmoe_spec
    return model
