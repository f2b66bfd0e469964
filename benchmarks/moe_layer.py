"""Benchmark one MoE MLP layer against its dense equivalent, the naive per-expert loop, and RMoE.

Prints, in one run, fwd+bwd throughput of the MoE MLP (top-1 and top-2) relative to the dense MLP of
equal active FLOPs (goal ≥ 0.9) and to the per-expert loop, and the RMoE frozen-core training step
time relative to the full-MoE step (goal ≤ 0.8). Variants are interleaved in every repeat round (in a
rotating order) and medians are reported, so drift from other processes on the machine cancels out.

    .venv/bin/python benchmarks/moe_layer.py                          # CPU, float32, ViT-S sized
    .venv/bin/python benchmarks/moe_layer.py --quick                  # smoke test, a few seconds
    .venv/bin/python benchmarks/moe_layer.py --device cuda --dtype bfloat16   # bf16 autocast, ragged GEMM

A benchmark, not a test: goals are marked PASS/MISS but the exit status is 0 either way.

What limits top-1 on a CPU (torch.profiler, default sizes, 2 cores, fwd+bwd): the GEMMs alone take ~10% longer
than dense's (MoE 180 ms, dense 163 ms): 8 groups of ~T/8 rows run 5-10% slower than one T-row GEMM, and the
weight gradient writes E [I, O] blocks where dense writes one; routing, dispatch, combine and the aux losses add
~10 ms. Medians
on such a machine range 0.86-0.93 from run to run, so compare several runs, or the minimums' cross-check.

What limits the RMoE top-2 step on a CPU: memory, not FLOPs. Its GEMMs are about half the full MoE's (the
first core GEMM runs once per token, the frozen core takes no weight gradient), but each [k·T, H] activation
is 48 MiB at the default sizes, above glibc's 32 MiB ceiling for reusing freed heap memory: every such
buffer (gathered core term, activation, their gradients, the thin residual GEMMs' outputs) is mapped
afresh and page-faulted in, 21 ms for 48 MiB here against 1 ms to refill one in place (0.43 ms per MiB
above 32 MiB; below it, only until glibc reuses a freed buffer of that size, after the first rounds).
Measured on 2 cores: RMoE ÷ full MoE 0.847 (medians) with torch's default allocator, 0.750 with
`THP_MEM_ALLOC_ENABLE=1` in the environment (torch then backs buffers of ≥ 2 MiB with 2 MiB pages: 4.5 ms
for the same 48 MiB); the header says which allocator ran. Running the second core GEMM
once per token too, on the gate-weighted sum of a token's hidden rows, was tried and measured no faster
(it trades a [k·T, H]·[H, D] GEMM for passes over the same [k·T, H] rows).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from torch import nn

from rmoe.moe import MoEConfig, MoEMlp
from rmoe.moe.grouped import make_layout

GOAL_MOE_VS_DENSE = 0.9  # MoE fwd+bwd tokens/s ÷ dense MLP of equal active FLOPs, at least
GOAL_RMOE_VS_MOE = 0.8  # RMoE frozen-core step time ÷ full-MoE step time, at most
# Tiny so the router (hence routing and load) stays put across repeats and variants; AdamW's cost does not
# depend on the learning rate.
LEARNING_RATE = 1e-6

FULL = {"tokens": 4096, "dim": 384, "hidden": 1536, "experts": 8, "repeats": 10, "warmup": 3}
QUICK = {"tokens": 512, "dim": 64, "hidden": 256, "experts": 8, "repeats": 3, "warmup": 1}


@dataclass(frozen=True)
class Bench:
    """Resolved benchmark settings."""

    tokens: int
    dim: int
    hidden: int
    experts: int
    top_ks: tuple[int, ...]
    rank: int
    repeats: int
    warmup: int
    device: torch.device
    dtype: torch.dtype
    backend: str
    seed: int

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 runs as mixed precision (fp32 weights, bf16 matmuls), as in training."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


@dataclass
class Variant:
    """One timed workload: `prepare` runs untimed before each timed `run`."""

    key: str
    top_k: int
    label: str
    prepare: Callable[[], None]
    run: Callable[[], None]


# ---- settings ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Bench:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, help=f"T, rows per forward (default {FULL['tokens']})")
    p.add_argument("--dim", type=int, help=f"D, model width (default {FULL['dim']})")
    p.add_argument("--hidden", type=int, help=f"H, expert hidden width (default {FULL['hidden']})")
    p.add_argument("--experts", type=int, help=f"E (default {FULL['experts']})")
    p.add_argument("--repeats", type=int, help=f"timed rounds, median reported (default {FULL['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed rounds first (default {FULL['warmup']})")
    p.add_argument("--top-k", default="1,2", help="comma-separated top-k values (default 1,2)")
    p.add_argument("--rank", type=int, default=16, help="RMoE low residual rank (default 16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16 = bf16 autocast")
    p.add_argument("--backend", choices=("auto", "padded", "grouped_mm"), default="auto", help="MoE expert layout")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; --quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke test")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    # --quick's tiny ops gain nothing from threads, and oversubscribed OpenMP threads on a busy machine
    # stall at every barrier (10x slower), which would break the smoke test's time budget.
    threads = a.threads or (1 if a.quick else None)
    if threads:
        torch.set_num_threads(threads)
    sizes = QUICK if a.quick else FULL
    pick = {name: getattr(a, name) if getattr(a, name) is not None else default for name, default in sizes.items()}
    return Bench(
        top_ks=tuple(int(k) for k in a.top_k.split(",")),
        rank=a.rank,
        device=torch.device(a.device),
        dtype=getattr(torch, a.dtype),
        backend=a.backend,
        seed=a.seed,
        **pick,
    )


# ---- layers --------------------------------------------------------------------------------------
def moe_config(b: Bench, top_k: int, **changes: object) -> MoEConfig:
    """Independent experts (full MoE) by default; `changes` turn it into an RMoE or the loop reference."""
    base = MoEConfig(num_experts=b.experts, top_k=top_k, residual=False, init_noise=0.01, expert_backend=b.backend)
    return base.replace(**changes)


def build_moe_layers(b: Bench, top_k: int) -> dict[str, MoEMlp]:
    """All MoE variants, upcycled from one dense MLP and sharing one router, so routing is identical."""
    source = Mlp(b.dim, b.hidden).to(b.device)
    configs = {
        "moe": moe_config(b, top_k),
        "loop": moe_config(b, top_k, expert_backend="loop"),
        "rmoe_lr": moe_config(b, top_k, residual=True, freeze_core=True, residual_rank=b.rank),
        "rmoe_fr": moe_config(b, top_k, residual=True, freeze_core=True, residual_rank=None),
    }
    layers = {key: MoEMlp.from_dense(source, cfg).to(b.device).train() for key, cfg in configs.items()}
    router_state = layers["moe"].router.state_dict()
    for layer in layers.values():
        layer.router.load_state_dict(router_state)
    return layers


def layout_name(b: Bench, layer: MoEMlp, x: torch.Tensor) -> str:
    """Which grouped layout the layer's experts pick under this device/dtype (e.g. padded vs ragged)."""
    counts = torch.full((b.experts,), 1, device=b.device)
    with b.autocast():
        widths = (layer.experts.in_features, layer.experts.hidden_features, layer.experts.out_features)
        return type(make_layout(counts, b.experts, layer.experts.backend, x, widths)).__name__


@torch.no_grad()
def load_imbalance(b: Bench, layer: MoEMlp, x: torch.Tensor) -> tuple[float, list[int]]:
    """max tokens per expert ÷ mean: the padded layout's FLOP overhead and the slowest expert's share."""
    with b.autocast():
        layer(x)
    aux = layer.pop_aux()
    assert aux is not None
    counts = aux.tokens_per_expert.float()
    return float(counts.max() / counts.mean()), [int(c) for c in aux.tokens_per_expert.tolist()]


# ---- workloads -----------------------------------------------------------------------------------
def dense_loss(b: Bench, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with b.autocast():
        y = mlp(x)
    return y.float().pow(2).mean()


def moe_loss(b: Bench, layer: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """Task loss plus the router's aux loss, so the router is trained like in a network."""
    with b.autocast():
        y = layer(x)
    aux = layer.pop_aux()
    assert aux is not None
    return y.float().pow(2).mean() + aux.loss


def clear_grads(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Fresh gradients each iteration (as zero_grad(set_to_none=True) in training), untimed."""

    def prepare() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None

    return prepare


def fwd_bwd(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        loss_fn().backward()

    return run


def train_step(module: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """zero_grad + fwd + bwd + AdamW step over the parameters that require grad (frozen core excluded)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return run


def variants_for(b: Bench, top_k: int, x: torch.Tensor, layers: dict[str, MoEMlp]) -> list[Variant]:
    """Everything timed for one top-k: fwd+bwd throughput rows, then training-step rows."""
    dense = Mlp(b.dim, top_k * b.hidden).to(b.device).train()
    k = f"k{top_k}"
    dense_run = fwd_bwd(lambda: dense_loss(b, dense, x))
    out = [Variant(f"{k}/dense", top_k, f"dense Mlp(D, {top_k}·H) fwd+bwd", clear_grads(dense, x), dense_run)]
    for key, label in (("moe", "MoE fwd+bwd"), ("loop", "MoE naive loop fwd+bwd")):
        layer = layers[key]
        out.append(Variant(f"{k}/{key}", top_k, label, clear_grads(layer, x), fwd_bwd(_bind(b, layer, x))))
    steps = (
        ("moe", "full MoE step"),
        ("rmoe_lr", f"RMoE frozen core r={b.rank} step"),
        ("rmoe_fr", "RMoE frozen core full-rank step"),
    )
    for key, label in steps:
        layer = layers[key]
        out.append(
            Variant(f"{k}/step_{key}", top_k, label, clear_grads(layer, x), train_step(layer, _bind(b, layer, x)))
        )
    return out


def _bind(b: Bench, layer: MoEMlp, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: moe_loss(b, layer, x)


# ---- timing --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(v: Variant, device: torch.device) -> float:
    v.prepare()
    _sync(device)
    start = time.perf_counter()
    v.run()
    _sync(device)
    return time.perf_counter() - start


def rotations(items: list[Variant], rounds: int) -> Iterator[tuple[int, list[Variant]]]:
    """Round r runs every variant once, starting at a different one each round (cancels order effects)."""
    for r in range(rounds):
        shift = r % len(items)
        yield r, items[shift:] + items[:shift]


def measure(b: Bench, variants: list[Variant]) -> dict[str, list[float]]:
    """Seconds per iteration of each variant over the timed (post-warm-up) rounds."""
    times: dict[str, list[float]] = {v.key: [] for v in variants}
    for r, order in rotations(variants, b.warmup + b.repeats):
        for v in order:
            t = time_once(v, b.device)
            if r >= b.warmup:
                times[v.key].append(t)
    return times


# ---- report --------------------------------------------------------------------------------------
def print_header(b: Bench, notes: list[str]) -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {_device_name(b.device)}")
    print(f"dtype {b.dtype} ({'bf16 autocast, fp32 weights' if b.dtype == torch.bfloat16 else 'no autocast'})")
    print(f"T={b.tokens} D={b.dim} H={b.hidden} E={b.experts} rank={b.rank} seed={b.seed}")
    print(f"warm-up {b.warmup} + {b.repeats} timed rounds, variants interleaved; AdamW lr={LEARNING_RATE:g}")
    print(f"load average before: {_load()}")
    if b.device.type == "cpu":
        print(_cpu_allocator(b))
    for line in notes:
        print(line)
    print()


def _cpu_allocator(b: Bench) -> str:
    """Which CPU allocator regime ran: buffers over 32 MiB are page-faulted in at every allocation unless torch
    backs them with huge pages (see the module docstring)."""
    largest = max(b.top_ks) * b.tokens * b.hidden * b.dtype.itemsize / 2**20
    huge = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"  # torch reads it at its first large allocation
    regime = "2 MiB pages (THP_MEM_ALLOC_ENABLE=1)" if huge else "default (4 KiB pages: > 32 MiB faulted in anew)"
    return f"CPU allocator: {regime}; largest activation [k·T, H] {largest:.0f} MiB"


def _load() -> str:
    """The machine's 1/5/15-min load: other processes on the cores are the main source of noise here."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(b: Bench, variants: list[Variant], times: dict[str, list[float]]) -> None:
    print(f"{'variant':<44}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'tokens/s':>12}")
    for v in variants:
        ts = times[v.key]
        med = statistics.median(ts)
        label = f"top-{v.top_k} {v.label}"
        print(f"{label:<44}{med * 1e3:>11.2f}{min(ts) * 1e3:>10.2f}{max(ts) * 1e3:>10.2f}{b.tokens / med:>12,.0f}")
    print()


@dataclass(frozen=True)
class Ratio:
    """A ratio of (median or minimum) times `num / den` per top-k, with an optional goal (`at_least` or at most)."""

    label: str
    num: str
    den: str
    goal: float | None = None
    at_least: bool = True

    def values(self, b: Bench, med: dict[str, float]) -> list[float]:
        return [med[f"k{k}/{self.num}"] / med[f"k{k}/{self.den}"] for k in b.top_ks]

    def verdict(self, value: float) -> str:
        if self.goal is None:
            return ""
        return "PASS" if (value >= self.goal if self.at_least else value <= self.goal) else "MISS"

    def goal_text(self) -> str:
        return "(info)" if self.goal is None else f"{'>=' if self.at_least else '<='} {self.goal}"


def ratios(b: Bench) -> list[Ratio]:
    """Throughput ratios are time ratios inverted (same T tokens), so `num` is the reference's time."""
    return [
        Ratio("MoE ÷ dense, fwd+bwd tokens/s", "dense", "moe", GOAL_MOE_VS_DENSE),
        Ratio("MoE ÷ naive loop, fwd+bwd tokens/s", "loop", "moe"),
        Ratio(f"RMoE r={b.rank} step ÷ full-MoE step, time", "step_rmoe_lr", "step_moe", GOAL_RMOE_VS_MOE, False),
        Ratio("RMoE full-rank step ÷ full-MoE step, time", "step_rmoe_fr", "step_moe"),
    ]


def print_ratios(b: Bench, times: dict[str, list[float]], stat: Callable[[list[float]], float], title: str) -> None:
    summary = {key: stat(ts) for key, ts in times.items()}
    heads = "".join(f"{'top-' + str(k):>14}" for k in b.top_ks)
    print(f"{title:<44}{heads}   goal")
    for r in ratios(b):
        cells = "".join(f"{v:>8.3f} {r.verdict(v):>5}" for v in r.values(b, summary))
        print(f"{r.label:<44}{cells}   {r.goal_text()}")
    print()


# ---- main ----------------------------------------------------------------------------------------
def prepare_all(b: Bench) -> tuple[list[Variant], list[str]]:
    """Build every variant for every top-k and describe layouts and routing load."""
    x = torch.randn(b.tokens, b.dim, device=b.device, requires_grad=True)  # LayerNorm-scaled like a ViT block
    variants: list[Variant] = []
    notes = []
    for top_k in b.top_ks:
        layers = build_moe_layers(b, top_k)
        imbalance, counts = load_imbalance(b, layers["moe"], x)
        layouts = {key: layout_name(b, layer, x) for key, layer in layers.items()}
        notes.append(
            f"top-{top_k}: tokens/expert {counts}, load imbalance max/mean = {imbalance:.3f}; layouts "
            + ", ".join(f"{key}={name}" for key, name in layouts.items())
        )
        variants += variants_for(b, top_k, x, layers)
    return variants, notes


def main(argv: list[str] | None = None) -> int:
    b = parse_args(argv)
    torch.manual_seed(b.seed)
    variants, notes = prepare_all(b)
    print_header(b, notes)
    times = measure(b, variants)
    print_table(b, variants, times)
    print_ratios(b, times, statistics.median, "ratio of medians")
    # Load from other processes only ever adds time, so on a busy machine the fastest round is the cleaner
    # estimate; shown as a cross-check of the medians, not instead of them.
    print_ratios(b, times, min, "ratio of minimums (cross-check)")
    print(f"load average after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
