"""Expert-parallel step time: EP=2 (two processes, gloo) vs EP=1 (one process) on the same global batch.

Prints the step times side by side, their ratio, and the share of the EP=2 step spent in all-to-all
(and the gradient all-reduce), measured with the torch profiler. On a 2-core CPU the two runs get the
same cores (EP=1: one process with 2 threads; EP=2: two processes with 1 thread each).

    python benchmarks/expert_parallel.py [--steps 6] [--batch 64] [--experts 8] [--top-k 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

import rmoe
from rmoe_platform.stage.worker.expert_parallel import parallelize

ARCH = "rmoe_vit_nano_patch4_32"


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, num_experts=args.experts, top_k=args.top_k, moe_layers="all", embed_dim=192)


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)


def train_step(model: torch.nn.Module, plan, optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    logits, aux = rmoe.forward_with_aux(plan.module, images)  # DDP over the replicated parameters
    loss = torch.nn.functional.cross_entropy(logits, labels) + aux.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    plan.sync_expert_gradients()
    optimizer.step()


def timed_steps(model, plan, optimizer, images, labels, steps: int) -> list[float]:
    train_step(model, plan, optimizer, images, labels)  # warm-up
    times = []
    for _ in range(steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        train_step(model, plan, optimizer, images, labels)
        times.append(time.perf_counter() - start)
    return times


def communication_share(model, plan, optimizer, images, labels) -> tuple[float, float]:
    """Fractions of one profiled step's wall time in all-to-all and in all-reduce (rank-local)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_step(model, plan, optimizer, images, labels)
        wall = time.perf_counter() - start
    all_to_all = all_reduce = 0.0
    for event in prof.key_averages():
        name = event.key.lower()
        if name.startswith("c10d::") or name.startswith("gloo:"):
            if "alltoall" in name or "all_to_all" in name:
                all_to_all += event.cpu_time_total / 1e6
            elif "allreduce" in name or "all_reduce" in name:
                all_reduce += event.cpu_time_total / 1e6
    return all_to_all / wall, all_reduce / wall


def ep_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(args)
    plan = parallelize(model, ep_size=world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = batch(args)
    local = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    times = timed_steps(model, plan, optimizer, images[local], labels[local], args.steps)
    share = communication_share(model, plan, optimizer, images[local], labels[local])
    if rank == 0:
        Path(out).write_text(f"{statistics.median(times)} {share[0]} {share[1]}")
    dist.destroy_process_group()


def single_process(args: argparse.Namespace) -> float:
    torch.set_num_threads(args.threads)
    model = build(args)
    plan = parallelize(model, ep_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return statistics.median(timed_steps(model, plan, optimizer, *batch(args), args.steps))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the EP=2 processes)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads shared by each run")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {ARCH} (width 192, all 6 MLPs MoE), E={args.experts}, top-{args.top_k}, "
        f"global batch {args.batch}, {args.threads} threads, median of {args.steps} steps"
    )
    ep1 = single_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/ep2.txt"
        mp.start_processes(ep_worker, args=(2, free_port(), args, out), nprocs=2, start_method="spawn")
        ep2, a2a, allreduce = (float(v) for v in Path(out).read_text().split())
    print(f"{'layout':<24}{'step (s)':>10}")
    print(f"{'EP=1, 1 process':<24}{ep1:>10.3f}")
    print(f"{'EP=2, 2 processes':<24}{ep2:>10.3f}")
    print(f"EP=2 step time / EP=1 step time: {ep2 / ep1:.2f}")
    print(f"EP=2 share of the step in all-to-all: {a2a:.1%}; in gradient all-reduce: {allreduce:.1%}")


if __name__ == "__main__":
    main()
