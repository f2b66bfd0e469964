"""Model checkpoints as safetensors (no pickled weights), carrying the `ModelSpec` that rebuilds them."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
    """Tensors from a safetensors file, or from a torch file loaded with `weights_only=True` (a
    `state_dict` or `model` wrapper key is unwrapped). Anything else is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint: {str(path)!r} is not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _refusal_reason(str(err))
        raise ValueError(
            f"checkpoint: {str(path)!r} holds pickled Python objects that torch.load(weights_only=True) refuses "
            f"({reason}); save a state dict of tensors, or safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"checkpoint: {str(path)!r} is not a readable torch file ({err})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {str(path)!r} does not hold a state dict of tensors")
    return state


def _refusal_reason(message: str) -> str:
    """The line of torch's weights_only refusal that names the offending global, without ANSI codes."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in message.splitlines()]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "refused")


def state_mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every key whose presence or shape differs, in the model's order then the file's, each with the
    shapes on both sides ("-" where a side lacks the key)."""
    out = []
    for key, tensor in expected.items():
        if key not in state:
            out.append(f"{key}: checkpoint - vs model {tuple(tensor.shape)}")
        elif state[key].shape != tensor.shape:
            out.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(tensor.shape)}")
    out.extend(f"{key}: checkpoint {tuple(t.shape)} vs model -" for key, t in state.items() if key not in expected)
    return out


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load `state` strictly; a mismatch raises a ValueError listing the first keys that differ."""
    expected = model.state_dict()
    mismatches = state_mismatches(expected, state)
    if mismatches:
        missing = sum(k not in state for k in expected)
        unexpected = sum(k not in expected for k in state)
        shapes = len(mismatches) - missing - unexpected
        counts = f"{missing} missing, {unexpected} unexpected, {shapes} shape mismatch"
        shown = "; ".join(mismatches[:6]) + (" …" if len(mismatches) > 6 else "")
        raise ValueError(f"{source}: mismatched checkpoint ({counts}): {shown}")
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
