"""Benchmark RoIAlign forward + backward on CPU: mmcv's kernel against the sparse product of
`rmoe_platform.mm.roi_align`, over feature-map sizes (RoIs of 4-40% of the image side, so larger maps mean
more samples per bin), with Mask R-CNN's two RoI layers (7x7 box RoIs, 14x14 mask RoIs) at the CPU detection
stages' counts. Prints, per case, both times, their ratio, the most samples per bin and axis (what
`RoIAlign` decides by) and which path `RoIAlign` takes, and checks that the two agree.

    .venv/bin/python benchmarks/roi_align.py            # 16x16 to 128x128 maps, 2 threads
    .venv/bin/python benchmarks/roi_align.py --quick    # a smoke test

A benchmark, not a test: the exit status is 0 unless the two implementations disagree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from mmcv.ops import roi_align as mmcv_roi_align

from rmoe_platform.mm.roi_align import MAX_SPARSE_GRID, RoIAlign, sparse_roi_align

SPATIAL_SCALE = 0.25  # the finest FPN level (stride 4), where a small image's RoIs all land
# (RoIs, output bins): the box head's sampled RoIs and the mask head's positive ones, for a batch of 16
LAYERS = {"box 7x7": (512, 7), "mask 14x14": (128, 14)}


def random_rois(count: int, images: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """RoIs of 4-40% of the image side, anywhere in it, some crossing its edge."""
    image = torch.randint(0, images, (count, 1), generator=generator).float()
    size = (torch.rand(count, 2, generator=generator) * 0.36 + 0.04) * image_size
    corner = torch.rand(count, 2, generator=generator) * image_size * 1.1 - 0.05 * image_size
    return torch.cat([image, corner, corner + size], 1)


def fwd_bwd_ms(fn: Callable[[], torch.Tensor], features: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        features.grad = None
        start = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16,32,64,128", help="feature-map sides (stride-4 maps of 4x larger images)")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="16x16 maps, 2 repeats")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [16] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 2 if args.quick else args.repeats
    generator = torch.Generator().manual_seed(0)
    print(f"RoIAlign fwd+bwd on CPU, {args.threads} threads, {args.images} images, {args.channels} channels")
    print(f"{'map':>8} {'layer':>11} {'mmcv ms':>8} {'sparse ms':>10} {'ratio':>6} {'samples':>8}  RoIAlign uses")
    disagree = 0
    for side in sizes:
        features = torch.randn(args.images, args.channels, side, side, generator=generator, requires_grad=True)
        for layer, (count, bins) in LAYERS.items():
            rois = random_rois(count, args.images, side * 4, generator)
            module = RoIAlign(bins, SPATIAL_SCALE, sampling_ratio=0, aligned=True)
            grids = module.grids(rois)

            def kernel(features=features, rois=rois, bins=bins) -> torch.Tensor:
                return mmcv_roi_align(features, rois, (bins, bins), SPATIAL_SCALE, 0, "avg", True)

            def sparse(features=features, rois=rois, module=module) -> torch.Tensor:
                return sparse_roi_align(features, module.grids(rois))

            disagree += not agree(kernel, sparse, features)
            kernel_ms = fwd_bwd_ms(kernel, features, repeats)
            sparse_ms = fwd_bwd_ms(sparse, features, repeats)
            samples = grids.largest()
            path = "mmcv" if module.sparse_grids(features, rois) is None else "sparse"
            print(
                f"{side:>4}x{side:<3} {layer:>11} {kernel_ms:8.1f} {sparse_ms:10.1f} "
                f"{sparse_ms / kernel_ms:6.2f} {samples:8d}  {path}"
            )
    print(f"RoIAlign takes the sparse product while RoIs need at most {MAX_SPARSE_GRID} samples per bin and axis")
    if disagree:
        print(f"FAIL: {disagree} case(s) where the two implementations disagree")
    return 1 if disagree else 0


def agree(kernel: Callable[[], torch.Tensor], sparse: Callable[[], torch.Tensor], features: torch.Tensor) -> bool:
    features.grad = None
    expected = kernel()
    (expected * torch.linspace(0, 1, expected.numel()).view_as(expected)).sum().backward()
    expected_grad, features.grad = features.grad, None
    got = sparse()
    (got * torch.linspace(0, 1, got.numel()).view_as(got)).sum().backward()
    ok = torch.allclose(got, expected, atol=1e-5) and torch.allclose(features.grad, expected_grad, atol=1e-4)
    features.grad = None
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
