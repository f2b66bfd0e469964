"""Expert parallelism on 2 Ray workers equals one process on the same global batch (fp32 and bf16)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import ray.cloudpickle
import timm
import torch
from safetensors.torch import load_file, save_file

import rmoe
from rmoe_platform.stage.worker.expert_parallel import ParallelDims, parallelize
from rmoe_platform.stage.worker.precision import Precision

CASES = [(1, None), (2, None), (1, 0.5), (2, 0.5)]
GLOBAL_BATCH = 8
# Relative tolerances of the 2-worker loss and gradients against one process: fp32 sums in another order;
# bf16 autocast rounds every matmul to 8 mantissa bits (2^-8 = 0.4%), and the errors add up over layers.
TOLERANCES = {"fp32": 1e-5, "bf16": 2e-2}


def build(top_k: int, capacity: float | None, routing_groups: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "rmoe_vit_nano_patch4_32",
        num_experts=4,
        top_k=top_k,
        capacity_factor=capacity,
        routing_groups=routing_groups,
        freeze_core=False,
        init_noise=0.1,
        aux_weights=dict(importance=0.1, switch=0.1, z=0.01),
    )


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def loss_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str) -> torch.Tensor:
    with Precision.of(precision, torch.device("cpu")).autocast():
        logits, aux = rmoe.forward_with_aux(model, images)
        return torch.nn.functional.cross_entropy(logits.float(), labels) + aux.loss


def ep_worker(config: dict) -> None:
    """One worker: its half of the global batch, experts sharded, the forward through DDP, expert gradients
    synced and gathered."""
    import ray.train

    from rmoe_platform.stage.worker import collectives

    rank, world = collectives.rank(), collectives.world_size()
    images, labels = global_batch()
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for precision in TOLERANCES:
        for top_k, capacity in CASES:
            model = build(top_k, capacity, routing_groups=1)
            plan = parallelize(model, ep_size=world)
            loss = loss_of(plan.module, images[local], labels[local], precision)
            loss.backward()
            plan.sync_expert_gradients()
            mean_loss = collectives.all_reduce(loss.detach().clone(), op="avg")
            grads = {
                name: plan.gather_experts(p.grad) if name in plan.expert_params else p.grad.clone().contiguous()
                for name, p in model.named_parameters()
                if p.grad is not None
            }
            if rank == 0:
                grads["__loss__"] = mean_loss.reshape(1)
                save_file(grads, f"{config['out']}/{precision}_k{top_k}_c{capacity}.safetensors")
    ray.train.report({"done": 1})


def run_on_two_ray_workers(worker: Callable[[dict], None], tmp_path: Path) -> None:
    """Run `worker` (defined in this module, shipped by value) on 2 Ray Train workers with gloo."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        worker,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name=worker.__name__),
    ).fit()


@pytest.mark.slow
def test_two_ray_workers_match_one_process(ray_local, tmp_path: Path) -> None:
    run_on_two_ray_workers(ep_worker, tmp_path)

    images, labels = global_batch()
    for (precision, tolerance), (top_k, capacity) in itertools.product(TOLERANCES.items(), CASES):
        case = f"{precision} k={top_k} capacity={capacity}"
        reference = build(top_k, capacity, routing_groups=2)  # capacity per worker-sized group
        loss = loss_of(reference, images, labels, precision)
        loss.backward()
        distributed = load_file(str(tmp_path / f"{precision}_k{top_k}_c{capacity}.safetensors"))
        torch.testing.assert_close(distributed.pop("__loss__")[0], loss.detach(), rtol=tolerance, atol=0, msg=case)
        reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        assert set(distributed) == set(reference_grads)
        for name, grad in reference_grads.items():
            err = (distributed[name] - grad).norm() / grad.norm().clamp_min(1e-12)
            assert err <= tolerance, f"{case} {name}: relative error {err:.2e}"


def test_single_process_parallelize_is_a_no_op_split() -> None:
    model = build(1, None, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = parallelize(model, ep_size=1)
    assert plan.expert_params and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(plan.expert_params).isdisjoint(plan.replicated_params)


def test_parallel_dims_reject_bad_grid() -> None:
    with pytest.raises(ValueError, match="expert_parallel_size"):
        ParallelDims(world_size=3, rank=0, ep_size=2)
    dims = ParallelDims(world_size=4, rank=3, ep_size=2)
    assert (dims.ep_rank, dims.dp_size, dims.ep_group_ranks(1), dims.replica_group_ranks(1)) == (1, 2, [2, 3], [1, 3])


def test_ep_size_that_does_not_divide_the_workers_is_rejected() -> None:
    with pytest.raises(ValueError, match="expert_parallel_size"):
        parallelize(build(1, None, 1), ep_size=3)


@pytest.mark.slow
def test_replicas_stay_identical_under_gradient_clipping(ray_local, tmp_path: Path) -> None:
    """After clipped steps, every replicated parameter is bitwise equal on both workers."""
    run_on_two_ray_workers(clipped_steps_worker, tmp_path)
    rank0, rank1 = (load_file(str(tmp_path / f"replicated_{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)


def clipped_steps_worker(config: dict) -> None:
    import ray.train

    from rmoe_platform.stage.worker import collectives

    rank = collectives.rank()
    model = build(2, None, 1)
    plan = parallelize(model, ep_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, labels = global_batch()
    for _ in range(3):
        optimizer.zero_grad()
        loss_of(plan.module, images[rank * 4 : rank * 4 + 4], labels[rank * 4 : rank * 4 + 4], "fp32").backward()
        plan.sync_expert_gradients()
        assert plan.clip_grad_norm_(0.01) > 0.01  # clipping really happens
        optimizer.step()
    replicated = {n: p.detach().contiguous() for n, p in plan.replicated_params.items()}
    save_file(replicated, f"{config['out']}/replicated_{rank}.safetensors")
    ray.train.report({"done": 1})
