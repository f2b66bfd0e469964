"""Expert parallelism applied to a single-device `rmoe` model from outside (`parallelize`).

Ranks form a device mesh world = dp × ep (torch's `DeviceMesh`, dims "dp" and "ep"): an expert-parallel
group is `ep` consecutive ranks that split each MoE layer's experts between them and exchange tokens with
all-to-all; ranks holding the same expert shard (same position in their EP group) form that shard's
data-parallel replica group. Everything that is not an expert shard is replicated on every rank.

Gradients: every rank's loss is the mean over its local batch, so the global loss is their average.
A parameter's gradient is therefore the sum over the ranks holding a copy of it, divided by world:
- replicated parameters: torch's DistributedDataParallel averages them over all ranks, bucketed and
  overlapped with the backward pass (the expert shards are registered as DDP-ignored);
- expert shards: the all-to-all backward already brought in the gradients from the rest of the EP group;
  `sync_expert_gradients` sums them over the replica group and divides by world, after the backward.

Only the dispatcher and these helpers talk to other ranks, always through `collectives`; the layer's math
is untouched. Shape suffixes: T tokens, K slots, N rows, E experts, L local experts, R ranks in the EP group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from rmoe.moe.dispatch import Dispatched, TokenDispatcher, sort_slots_by_expert
from rmoe.moe.routing import Routing
from rmoe.upcycle import moe_layers
from rmoe_platform.stage.worker import collectives


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    ep_size: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(
                f"expert_parallel_size ({self.ep_size}) must divide the number of workers ({self.world_size})"
            )

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    def ep_group_ranks(self, dp_index: int) -> list[int]:
        return list(range(dp_index * self.ep_size, (dp_index + 1) * self.ep_size))

    def replica_group_ranks(self, ep_index: int) -> list[int]:
        return list(range(ep_index, self.world_size, self.ep_size))


@dataclass
class AllToAllState:
    slot_order_N: torch.Tensor
    regroup_N: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int
    top_k: int


class AllToAllDispatcher(TokenDispatcher):
    """Sends each routed row to the rank holding its expert and brings the outputs back (autograd-aware)."""

    def __init__(self, ep_group: dist.ProcessGroup | None, ep_size: int, num_local_experts: int) -> None:
        self.ep_group = ep_group
        self.ep_size = ep_size
        self.num_local = num_local_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        R, L = self.ep_size, self.num_local
        slot_order_N, counts_E = sort_slots_by_expert(routing)
        send_counts_RL = counts_E.view(R, L)
        recv_counts_RL = collectives.all_to_all(torch.empty_like(send_counts_RL), send_counts_RL, self.ep_group)
        # the split sizes are the one host sync of a dispatch: all-to-all needs them on the host
        splits = torch.stack([send_counts_RL.sum(1), recv_counts_RL.sum(1)]).tolist()
        send_splits, recv_splits = splits[0], splits[1]
        x_sorted_ND = x_TD.index_select(0, slot_order_N // routing.top_k)
        x_recv_ND = collectives.all_to_all_autograd(x_sorted_ND, recv_splits, send_splits, self.ep_group)
        # rows arrive ordered (source rank, local expert); experts want them grouped by local expert
        local_expert_N = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(R), recv_counts_RL.reshape(-1)
        )
        regroup_N = torch.argsort(local_expert_N, stable=True)
        state = AllToAllState(slot_order_N, regroup_N, send_splits, recv_splits, x_TD.shape[0], routing.top_k)
        return Dispatched(x_recv_ND.index_select(0, regroup_N), recv_counts_RL.sum(0), state)

    def combine(self, y_NO: torch.Tensor, state: object) -> torch.Tensor:
        assert isinstance(state, AllToAllState)
        y_recv_NO = torch.empty_like(y_NO).index_copy_(0, state.regroup_N, y_NO)
        y_sorted_NO = collectives.all_to_all_autograd(y_recv_NO, state.send_splits, state.recv_splits, self.ep_group)
        T, K = state.num_tokens, state.top_k
        y_TKO = y_NO.new_zeros(T * K, y_NO.shape[-1]).index_copy_(0, state.slot_order_N, y_sorted_NO)
        return y_TKO.view(T, K, y_NO.shape[-1])

    def reduce_sum(self, stats: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce_autograd(stats)


@dataclass
class ExpertParallelPlan:
    """What `parallelize` did: the mesh and its groups, which parameters are expert shards, and the module a
    training step calls (`module`: DDP over the replicated parameters, or the model itself)."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    module: nn.Module
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)
    replicated_params: dict[str, nn.Parameter] = field(default_factory=dict)

    def sync_expert_gradients(self) -> None:
        """Sum each expert shard's gradient over its replica group and divide by world (one flat bucket)."""
        trainable = [p for p in self.expert_params.values() if p.requires_grad]
        if not trainable or self.dims.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.dims.dp_size > 1:
            flat = collectives.all_reduce(flat, group=self.replica_group)
        flat /= self.dims.world_size
        for param, part in zip(trainable, flat.split([p.numel() for p in trainable]), strict=True):
            param.grad = part.view_as(param)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the *whole* model's gradient, identical on every rank; returns that norm as a
        device tensor (no host sync: reading it is the caller's choice).

        Clipping each rank by its local norm would scale replicated gradients differently per rank
        (each holds different expert shards), and the replicas would drift apart.
        """
        replicated = [p.grad for p in self.replicated_params.values() if p.grad is not None]
        experts = [p.grad for p in self.expert_params.values() if p.grad is not None]
        device = next(iter(self.module.parameters())).device
        sq_experts = _squared_norm(experts, device)
        if self.dims.ep_size > 1:
            sq_experts = collectives.all_reduce(sq_experts, group=self.ep_group)
        total = (_squared_norm(replicated, device) + sq_experts).sqrt()
        if math.isfinite(max_norm):
            scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
            grads = [*replicated, *experts]
            for group in _by_device_and_dtype(grads):
                torch._foreach_mul_(group, scale.to(group[0].dtype))
        return total

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The single-device state dict: expert shards gathered from the EP group (collective)."""
        state = model.state_dict()
        for name in self.expert_params:
            state[name] = self.gather_experts(state[name])
        return state

    def gather_experts(self, shard: torch.Tensor) -> torch.Tensor:
        """Concatenate an expert-stacked tensor's shards along dim 0 in EP-rank order (collective)."""
        if self.dims.ep_size == 1:
            return shard.detach().clone()
        return collectives.all_gather_cat(shard, self.ep_group)

    def shard_experts(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full expert-stacked tensor."""
        local = full.shape[0] // self.dims.ep_size
        return full[self.dims.ep_rank * local : (self.dims.ep_rank + 1) * local]


def parallelize(model: nn.Module, ep_size: int, *, find_unused_parameters: bool = False) -> ExpertParallelPlan:
    """Shard every MoE layer's experts over EP groups of `ep_size` ranks, swap in all-to-all dispatch, and
    wrap the model in DDP for the replicated parameters.

    Call after `torch.distributed` is initialised and the model is on its device, on every rank, with
    identical models (same seed or same checkpoint). Works for world size 1 too (then it only records the
    parameter split). `find_unused_parameters`: for models some of whose parameters may get no gradient in
    a step (DDP must then look for them).
    """
    dims = ParallelDims(collectives.world_size(), collectives.rank(), ep_size)
    device = next(iter(model.parameters())).device
    mesh = _mesh(dims, device)
    ep_group = replica_group = None
    if mesh is not None:
        ep_group, replica_group = mesh.get_group("ep"), mesh.get_group("dp")
    plan = ExpertParallelPlan(dims, mesh, ep_group, replica_group, model)
    for layer_name, layer in moe_layers(model):
        E = layer.num_experts
        if E % ep_size:
            raise ValueError(f"num_experts ({E}) of {layer_name} must be divisible by expert_parallel_size ({ep_size})")
        experts = layer.experts
        for param_name in experts.expert_parameter_names():
            full = getattr(experts, param_name)
            shard = nn.Parameter(plan.shard_experts(full.detach()).clone(), requires_grad=full.requires_grad)
            setattr(experts, param_name, shard)
            plan.expert_params[f"{layer_name}.experts.{param_name}"] = shard
        experts.num_experts = E // ep_size
        if dims.world_size > 1:
            layer.dispatcher = AllToAllDispatcher(ep_group, ep_size, E // ep_size)
    expert_ids = {id(p) for p in plan.expert_params.values()}
    plan.replicated_params = {n: p for n, p in model.named_parameters() if id(p) not in expert_ids}
    plan.module = _replicate(model, plan, device, find_unused_parameters)
    return plan


def _mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """The dp × ep mesh over all ranks (every rank builds it, in the same order: a torch requirement)."""
    if dims.world_size == 1:
        return None
    return init_device_mesh(device.type, (dims.dp_size, dims.ep_size), mesh_dim_names=("dp", "ep"))


def _replicate(model: nn.Module, plan: ExpertParallelPlan, device: torch.device, find_unused: bool) -> nn.Module:
    """DDP over the replicated parameters (experts ignored: they are shards, synchronised by the plan)."""
    if plan.dims.world_size == 1 or not any(p.requires_grad for p in plan.replicated_params.values()):
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(plan.expert_params))
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        gradient_as_bucket_view=True,
    )


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ‖g‖² over `grads` in float64, on the device (one fused norm kernel per device and dtype)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group in _by_device_and_dtype(grads):
        norms = torch._foreach_norm(group)
        total = total + torch.stack(norms).to(device=device, dtype=torch.float64).pow(2).sum()
    return total


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())
