"""Every collective the platform runs, in one place.

A process group takes tensors on its own device: NCCL (Ray Train's group on GPU workers) refuses CPU
tensors, gloo (CPU workers) refuses CUDA ones. Callers hand in tensors wherever they live; each function
here runs the collective on the group's device (`comm_device`) and returns the result on the caller's
device, copying only when the two differ. Without an initialised process group (one process, tests)
every function is the identity of a world of one.

The autograd-aware variants (`all_to_all_autograd`, `all_reduce_autograd`) use
`torch.distributed.nn.functional`: torch marks it deprecated in favour of `_functional_collectives`, but
those drop gradients under gloo in torch 2.13 (measured), which CPU training needs.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

Group = dist.ProcessGroup | None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Group = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Group = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def comm_device(group: Group = None) -> torch.device:
    """The device a collective of `group` runs on: the current CUDA device for an NCCL-only group, else CPU
    (gloo, and mixed groups such as 'cpu:gloo,cuda:nccl', which take CPU tensors)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _move(tensor: torch.Tensor, source: torch.device, target: torch.device) -> torch.Tensor:
    """`tensor` (on `source`) on `target`: itself when they are the same device. Host-to-device copies do
    not block; device-to-host copies do (the caller reads the values next)."""
    if source == target:
        return tensor
    return tensor.to(target, non_blocking=target.type == "cuda")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Group = None) -> torch.Tensor:
    """The sum (or 'max', 'min', 'avg') of `tensor` over the group, on the caller's device. `tensor` itself
    is reduced in place when it lives on the group's device; the result is returned either way."""
    if world_size(group) == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in (*reduce_op, "avg"):
        raise ValueError(f"all_reduce: unknown op {op!r}")
    device = comm_device(group)
    moved = _move(tensor, tensor.device, device)
    dist.all_reduce(moved, op=reduce_op.get(op, dist.ReduceOp.SUM), group=group)
    if op == "avg":
        moved /= world_size(group)
    return _move(moved, device, tensor.device)


def barrier(group: Group = None) -> None:
    """Every worker of the group waits (on the host) until all have arrived."""
    if world_size(group) > 1:
        dist.barrier(group=group)


def all_gather_cat(tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Every rank's `tensor` (equal shapes) concatenated along dim 0 in rank order, on the caller's device."""
    size = world_size(group)
    if size == 1:
        return tensor.detach().clone()
    device = comm_device(group)
    moved = _move(tensor.detach().contiguous(), tensor.device, device)
    out = moved.new_empty((size * moved.shape[0], *moved.shape[1:]))
    dist.all_gather_into_tensor(out, moved, group=group)
    return _move(out, device, tensor.device)


def all_gather_objects(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (one pickled byte tensor each way, on the group's device)."""
    size = world_size(group)
    if size == 1:
        return [obj]
    device = comm_device(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    lengths = all_gather_cat(length, group).tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload.to(device)
    gathered = all_gather_cat(padded.unsqueeze(0), group).cpu()
    return [pickle.loads(gathered[i, :n].numpy().tobytes()) for i, n in enumerate(lengths)]


def all_to_all(output: torch.Tensor, tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Equal splits of dim 0 exchanged between the group's ranks (no autograd): `output` is filled and
    returned. Both must live on the group's device (the expert-parallel dispatcher's tensors do)."""
    dist.all_to_all_single(output, tensor, group=group)
    return output


def all_to_all_autograd(
    tensor: torch.Tensor,
    output_split_sizes: Sequence[int],
    input_split_sizes: Sequence[int],
    group: Group = None,
) -> torch.Tensor:
    """Rows of `tensor` sent to the group's ranks in `input_split_sizes`, received in `output_split_sizes`;
    the backward sends the gradients back the same way."""
    out = tensor.new_empty(sum(output_split_sizes), *tensor.shape[1:])
    return dist_fn.all_to_all_single(
        out, tensor, output_split_sizes=list(output_split_sizes), input_split_sizes=list(input_split_sizes), group=group
    )


def all_reduce_autograd(tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Differentiable sum over the group (the backward sums the gradients the same way)."""
    if world_size(group) == 1:
        return tensor
    return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
