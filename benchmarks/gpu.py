"""GPU speed, side by side in one run (the second half of `benchmarks/device_check.sh`):

1. the MoE MLP (E=8, top-1 and top-2) in bf16 at a large token count, fwd+bwd tokens/s ÷ the dense MLP of
   equal active FLOPs (goal >= 0.9), from `benchmarks/moe_layer.py` on CUDA;
2. the model FLOP utilisation of a Swin-T RMoE training step in bf16: analytic training FLOPs
   (`rmoe.cost`) ÷ measured step time ÷ the device's peak dense bf16 FLOP/s (goal >= 40% on an H100);
3. the bf16 ÷ fp32 step-time ratio of that same step (fp32 with torch's defaults: no TF32 matmuls).

    .venv/bin/python benchmarks/gpu.py [--batch 64] [--steps 10]

Without a CUDA device it says so and exits 1. A benchmark, not a test: goals are marked PASS/MISS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # moe_layer, beside this file

import moe_layer

import rmoe
from rmoe import ModelSpec, MoEConfig
from rmoe import cost as rmoe_cost
from rmoe_platform.stage.worker.precision import Precision

GOAL_MFU = 0.40
# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets, by device-name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
MOE_MLP_ARGS = ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "32768", "--dim", "768", "--hidden", "3072"]
MOE_MLP_ARGS += ["--experts", "8", "--top-k", "1,2", "--repeats", "10", "--warmup", "3"]


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def swin_t_rmoe() -> torch.nn.Module:
    """Swin-T with RMoE layers: every other MLP upcycled to 8 residual experts (top-1), all weights trained."""
    model = rmoe.build_model(ModelSpec("rmoe_swin_tiny_patch4_window7_224", {"num_classes": 1000}))
    rmoe.upcycle(model, "every_other", MoEConfig(num_experts=8, top_k=1, init_noise=0.01, freeze_core=False))
    return model


def step_seconds(model: torch.nn.Module, precision: str, batch: int, steps: int) -> float:
    """Median time of one training step (forward, backward, AdamW) at `precision`."""
    device = torch.device("cuda")
    amp = Precision.of(precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with amp.autocast():
            logits, aux = rmoe.forward_with_aux(model, images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels) + aux.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images per Swin-T step (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision (default 10)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; this benchmark needs one GPU", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name()
    print(f"== 1. MoE MLP vs dense MLP of equal active FLOPs, bf16, on {name}")
    moe_layer.main(MOE_MLP_ARGS)

    print(f"== 2./3. Swin-T RMoE training step (batch {args.batch}, 224 px), on {name}")
    torch.manual_seed(0)
    model = swin_t_rmoe().cuda().train()
    flops = rmoe_cost.training_flops(model, args.batch, batch_size=args.batch)
    bf16 = step_seconds(model, "bf16", args.batch, args.steps)
    fp32 = step_seconds(model, "fp32", args.batch, args.steps)
    achieved = flops / bf16
    peak = peak_flops(name)
    print(f"analytic training FLOPs per step: {flops:.3e}")
    print(f"step time: bf16 {bf16 * 1e3:.1f} ms, fp32 {fp32 * 1e3:.1f} ms")
    print(f"achieved bf16: {achieved / 1e12:.1f} TFLOP/s")
    if peak is None:
        print(f"MFU: no peak bf16 FLOP/s on record for {name!r} (known: {', '.join(PEAK_BF16)})")
    else:
        mfu = achieved / peak
        verdict = "PASS" if mfu >= GOAL_MFU else "MISS"
        print(f"MFU (bf16, peak {peak / 1e12:.0f} TFLOP/s): {mfu:.1%} {verdict} (goal >= {GOAL_MFU:.0%} on an H100)")
    print(f"bf16 ÷ fp32 step time: {bf16 / fp32:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
