"""Read selected tensors of a checkpoint's `model.safetensors`, local or on S3, as numpy arrays.

The header is read first and then only the wanted byte ranges, so looking at a paper-scale model's
experts neither downloads the whole file nor imports torch (bf16 is widened to float32 by hand).
Which tensors are experts, cores or residuals is decided by `rmoe.moe.roles`, the same function training
uses; that file is standard library only and is loaded on its own (importing the `rmoe` package would
import torch).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow.fs as pafs

MODEL_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _load_roles() -> ModuleType:
    """`rmoe.moe.roles`, executed from its file without running `rmoe/__init__.py` (find_spec locates a
    top-level package without importing it)."""
    package = importlib.util.find_spec("rmoe")
    if package is None or not package.submodule_search_locations:
        raise ImportError("dashboard: the rmoe package is not installed")
    path = Path(next(iter(package.submodule_search_locations))) / "moe" / "roles.py"
    spec = importlib.util.spec_from_file_location("_rmoe_parameter_roles", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


roles = _load_roles()


def expert_weight(name: str):  # -> roles.MoEParameter | None
    """The MoE layer, role and tensor of an experts' weight (matrix or low-rank factor), else None."""
    found = roles.moe_parameter(name)
    return found if found is not None and found.is_expert_weight else None


def model_path(checkpoint_uri: str) -> str:
    return f"{checkpoint_uri.rstrip('/')}/{MODEL_FILE}"


def read_tensors(fs: pafs.FileSystem, path: str, want: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The tensors whose names `want` accepts, as numpy arrays (bf16 widened to float32)."""
    with fs.open_input_file(path) as stream:
        (size,) = struct.unpack("<Q", stream.read_at(8, 0))
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(stream.read_at(size, 8))
        header.pop("__metadata__", None)
        out = {}
        for name, info in header.items():
            if want(name):
                begin, end = info["data_offsets"]
                raw = stream.read_at(end - begin, 8 + size + begin)
                out[name] = _decode(raw, info["dtype"], info["shape"], name)
    return out


def _decode(raw: bytes, dtype: str, shape: list[int], name: str) -> np.ndarray:
    if dtype == "BF16":  # the upper half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {dtype}")
    return np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).reshape(shape)


def expert_tensors(fs: pafs.FileSystem, path: str) -> dict[str, np.ndarray]:
    """Every MoE layer's expert (and core) weights in the checkpoint."""
    return read_tensors(fs, path, lambda name: expert_weight(name) is not None)


def dense_mlp_tensors(fs: pafs.FileSystem, path: str, layers: list[str]) -> dict[str, np.ndarray]:
    """The plain MLP weights (`<layer>.fc1.weight`, `<layer>.fc2.weight`) of `layers`, where the
    checkpoint has them (a dense parent of upcycled experts)."""
    wanted = {f"{layer}.{fc}.weight" for layer in layers for fc in ("fc1", "fc2")}
    return read_tensors(fs, path, wanted.__contains__)
