"""Expert parallelism applied to a single-device `rmoe` model from outside (`parallelize`).

Ranks form a grid world = dp × ep: an expert-parallel group is `ep` consecutive ranks that split
each MoE layer's experts between them and exchange tokens with all-to-all; ranks holding the same
expert shard (same position in their EP group) form that shard's replica group. Everything that is
not an expert shard is replicated on every rank.

Gradients: every rank's loss is the mean over its local batch, so the global loss is their average.
A parameter's gradient is therefore the sum over the ranks holding a copy of it, divided by world:
all ranks for replicated parameters (plain data parallelism), the shard's replica group for experts
(the all-to-all backward already brought in the gradients from the rest of the EP group).

Only the dispatcher and these helpers talk to other ranks; the layer's math is untouched.
Shape suffixes: T tokens, K slots, N rows, E experts, L local experts, R ranks in the EP group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# The autograd-aware collectives: torch marks them deprecated in favour of _functional_collectives, but
# the latter drop gradients under gloo in torch 2.13 (measured), which CPU training needs.
import torch.distributed.nn.functional as dist_fn
from torch import nn

from rmoe.moe.dispatch import Dispatched, TokenDispatcher, sort_slots_by_expert
from rmoe.moe.routing import Routing
from rmoe.upcycle import moe_layers


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
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL, group=self.ep_group)
        send_splits = send_counts_RL.sum(1).tolist()
        recv_splits = recv_counts_RL.sum(1).tolist()
        x_sorted_ND = x_TD.index_select(0, slot_order_N // routing.top_k)
        x_recv_ND = dist_fn.all_to_all_single(
            x_sorted_ND.new_empty(sum(recv_splits), x_TD.shape[-1]),
            x_sorted_ND,
            output_split_sizes=recv_splits,
            input_split_sizes=send_splits,
            group=self.ep_group,
        )
        # rows arrive ordered (source rank, local expert); experts want them grouped by local expert
        local_expert_N = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(R), recv_counts_RL.reshape(-1)
        )
        regroup_N = torch.argsort(local_expert_N, stable=True)
        state = AllToAllState(slot_order_N, regroup_N, send_splits, recv_splits, x_TD.shape[0], routing.top_k)
        return Dispatched(x_recv_ND.index_select(0, regroup_N), recv_counts_RL.sum(0), state)

    def combine(self, y_NO: torch.Tensor, state: object) -> torch.Tensor:
        assert isinstance(state, AllToAllState)
        y_recv_NO = torch.empty_like(y_NO).index_copy(0, state.regroup_N, y_NO)
        y_sorted_NO = dist_fn.all_to_all_single(
            y_NO.new_empty(sum(state.send_splits), y_NO.shape[-1]),
            y_recv_NO,
            output_split_sizes=state.send_splits,
            input_split_sizes=state.recv_splits,
            group=self.ep_group,
        )
        T, K = state.num_tokens, state.top_k
        y_TKO = y_NO.new_zeros(T * K, y_NO.shape[-1]).index_copy(0, state.slot_order_N, y_sorted_NO)
        return y_TKO.view(T, K, y_NO.shape[-1])

    def reduce_sum(self, stats: torch.Tensor) -> torch.Tensor:
        return dist_fn.all_reduce(stats, op=dist.ReduceOp.SUM)


@dataclass
class ExpertParallelPlan:
    """What `parallelize` did: process groups and which parameters are expert shards."""

    dims: ParallelDims
    ep_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)
    replicated_params: dict[str, nn.Parameter] = field(default_factory=dict)

    def sync_gradients(self) -> None:
        """Sum each gradient over the ranks holding a copy, then divide by world size."""
        _all_reduce_grads(list(self.replicated_params.values()), None, self.dims.world_size)
        _all_reduce_grads(list(self.expert_params.values()), self.replica_group, self.dims.world_size)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the *whole* model's gradient, identical on every rank.

        Clipping each rank by its local norm would scale replicated gradients differently per rank
        (each holds different expert shards), and the replicas would drift apart.
        """
        replicated = [p.grad for p in self.replicated_params.values() if p.grad is not None]
        experts = [p.grad for p in self.expert_params.values() if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float64)
        sq_replicated = sum((g.double().pow(2).sum().cpu() for g in replicated), zero)
        sq_experts = sum((g.double().pow(2).sum().cpu() for g in experts), zero).clone()
        if self.dims.ep_size > 1:
            dist.all_reduce(sq_experts, group=self.ep_group)
        total = float((sq_replicated + sq_experts).sqrt())
        scale = max_norm / (total + 1e-6)
        if scale < 1:
            for grad in (*replicated, *experts):
                grad.mul_(scale)
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
        parts = [torch.empty_like(shard) for _ in range(self.dims.ep_size)]
        dist.all_gather(parts, shard.detach().contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def shard_experts(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full expert-stacked tensor."""
        local = full.shape[0] // self.dims.ep_size
        return full[self.dims.ep_rank * local : (self.dims.ep_rank + 1) * local]


def parallelize(model: nn.Module, ep_size: int) -> ExpertParallelPlan:
    """Shard every MoE layer's experts over EP groups of `ep_size` ranks and swap in all-to-all dispatch.

    Call after `torch.distributed` is initialised, on every rank, with identical models (same seed or
    same checkpoint). Works for world size 1 too (then it only records the parameter split).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    dims = ParallelDims(world, rank, ep_size)
    ep_group, replica_group = _new_groups(dims)
    plan = ExpertParallelPlan(dims, ep_group, replica_group)
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
    return plan


def _new_groups(dims: ParallelDims) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Every rank creates every group in the same order (a torch.distributed requirement)."""
    if dims.world_size == 1:
        return None, None
    ep_group = replica_group = None
    for dp_index in range(dims.dp_size):
        group = dist.new_group(dims.ep_group_ranks(dp_index))
        if dims.rank in dims.ep_group_ranks(dp_index):
            ep_group = group
    for ep_index in range(dims.ep_size):
        group = dist.new_group(dims.replica_group_ranks(ep_index))
        if dims.rank in dims.replica_group_ranks(ep_index):
            replica_group = group
    return ep_group, replica_group


def _all_reduce_grads(params: list[nn.Parameter], group: dist.ProcessGroup | None, world_size: int) -> None:
    trainable = [p for p in params if p.requires_grad]
    if not trainable or world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= world_size
    offset = 0
    for p in trainable:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
