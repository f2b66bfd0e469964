"""RoIAlign for Mask R-CNN's RoI heads that is fast to train on CPU workers.

mmcv's (and torchvision's) CPU RoIAlign backward works output element by output element: in the CPU detection
stages it took ~50 ms per call, a fifth of a Mask R-CNN step, for a forward of 2 ms. Each RoIAlign output is
a fixed weighted sum of feature pixels (bilinear corners of each bin's samples, averaged), so the op is one
sparse matrix `K` (a row per RoI bin, `4·G_y·G_x` entries) times the features, and its backward is `Kᵀ` times
the gradient: both sparse products, on all cores. Its cost grows with the samples per bin, which adaptive
sampling (`sampling_ratio` 0) makes large for large RoIs on large maps: beyond `MAX_SPARSE_GRID` samples per
axis, and on other devices, mmcv's kernel runs (benchmarks/roi_align.py measures both).

Legend: N RoIs, C channels, B images of H×W, P×Q output bins, G samples per bin along an axis.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from mmcv.ops import roi_align as mmcv_roi_align
from torch import Tensor, nn

# The sparse product's time grows with G_y·G_x, the kernel's much more slowly (benchmarks/roi_align.py, 2 cores,
# 16 images, 64 channels, forward + backward: 0.15-0.21x the kernel's time at G = 1, 0.32-0.34x at G = 2, at G = 4
# 0.59x for 7x7 bins but 1.19x for 14x14, 1.41x at G = 8): it is taken while no RoI needs more samples per axis.
MAX_SPARSE_GRID = 3
SPARSE_DTYPES = (torch.float32, torch.float64)  # what torch's sparse CSR product takes on CPU


class RoIAlign(nn.Module):
    """Drop-in for `mmcv.ops.RoIAlign` (average pooling) in mmdet's RoI extractors: the same outputs (to float
    rounding) and gradients to the features, none to the RoIs. CPU fp32/fp64 inputs whose RoIs need at most
    `MAX_SPARSE_GRID` samples per bin and axis go through the sparse product, the rest through mmcv's kernel."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        pool_mode: str = "avg",
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if pool_mode != "avg":
            raise ValueError(f"RoIAlign: pool_mode {pool_mode!r} is not supported here (only 'avg')")
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned

    def forward(self, features_BCHW: Tensor, rois_N5: Tensor) -> Tensor:
        rois_N5 = rois_N5.detach()
        grids = self.sparse_grids(features_BCHW, rois_N5)
        if grids is not None:
            return sparse_roi_align(features_BCHW, grids)
        return mmcv_roi_align(
            features_BCHW, rois_N5, self.output_size, self.spatial_scale, self.sampling_ratio, "avg", self.aligned
        )

    def grids(self, rois_N5: Tensor) -> RoIGrids:
        return RoIGrids.of(rois_N5, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def sparse_grids(self, features_BCHW: Tensor, rois_N5: Tensor) -> RoIGrids | None:
        """The RoIs' grids when the sparse product applies (CPU fp32/fp64 features, at most `MAX_SPARSE_GRID`
        samples per bin and axis), else None: other devices compute no grid and take no host sync."""
        if features_BCHW.device.type != "cpu" or features_BCHW.dtype not in SPARSE_DTYPES:
            return None
        grids = self.grids(rois_N5)
        return grids if grids.largest() <= MAX_SPARSE_GRID else None

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


@dataclass(frozen=True)
class RoIGrids:
    """Where each RoI's bins sample the feature map, per axis (y, x; mmcv/Detectron2 conventions): the RoI's
    image, origin and size in feature pixels, and the samples per bin (`sampling_ratio`, or adaptive)."""

    image_N: Tensor
    start_N2: Tensor
    length_N2: Tensor
    grid_N2: Tensor
    bins: tuple[int, int]

    @classmethod
    def of(
        cls, rois_N5: Tensor, bins: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
    ) -> RoIGrids:
        """`rois_N5` rows are (image index, x1, y1, x2, y2) in input pixels; axes are ordered (y, x)."""
        offset = 0.5 if aligned else 0.0
        start_N2 = rois_N5[:, [2, 1]] * spatial_scale - offset
        length_N2 = rois_N5[:, [4, 3]] * spatial_scale - offset - start_N2
        if not aligned:
            length_N2 = length_N2.clamp(min=1.0)
        if sampling_ratio > 0:
            grid_N2 = torch.full_like(length_N2, float(sampling_ratio))
        else:
            grid_N2 = torch.ceil(length_N2 / length_N2.new_tensor(bins)).nan_to_num(0.0).clamp(min=0.0)
        return cls(rois_N5[:, 0].long(), start_N2, length_N2, grid_N2, bins)

    def largest(self) -> int:
        """The most samples per bin along either axis (a host sync: CPU inputs only)."""
        return int(self.grid_N2.max().item()) if self.grid_N2.numel() else 0

    def axis_corners(self, axis: int, size: int) -> tuple[Tensor, Tensor]:
        """[N, bins, 2G] pixel indices along `axis` and their weights: both bilinear corners of each sample,
        divided by the bin's sample count, with mmcv's edge rules (a sample beyond [-1, size] counts zero,
        one in [-1, 0) is clamped to 0, one past the last pixel takes that pixel). Padding samples of RoIs
        with fewer than the most samples weigh zero."""
        bins, grid_N = self.bins[axis], self.grid_N2[:, axis]
        most = max(self.largest(), 1)
        bin_N = self.length_N2[:, axis] / bins
        bin_index_B = torch.arange(bins, dtype=bin_N.dtype, device=bin_N.device)
        sample_index_G = torch.arange(most, dtype=bin_N.dtype, device=bin_N.device)
        position_NBG = (
            self.start_N2[:, axis, None, None]
            + bin_index_B[None, :, None] * bin_N[:, None, None]
            + (sample_index_G[None, None, :] + 0.5) * (bin_N / grid_N.clamp(min=1.0))[:, None, None]
        )
        # a NaN position (a diverged RoI) is not sampled; indices stay in range whatever the position
        sampled_NBG = (sample_index_G < grid_N[:, None, None]) & (position_NBG >= -1.0) & (position_NBG <= size)
        position_NBG = torch.where(sampled_NBG, position_NBG.clamp(min=0.0), torch.zeros_like(position_NBG))
        low_NBG = position_NBG.floor().long()
        at_edge_NBG = low_NBG >= size - 1
        low_NBG = low_NBG.clamp(0, size - 1)
        high_NBG = torch.where(at_edge_NBG, low_NBG, low_NBG + 1)
        fraction_NBG = torch.where(at_edge_NBG, torch.zeros_like(position_NBG), position_NBG - low_NBG)
        scale_NBG = sampled_NBG / grid_N.clamp(min=1.0)[:, None, None]
        index_NBG2 = torch.stack([low_NBG, high_NBG], dim=-1)
        weight_NBG2 = torch.stack([(1.0 - fraction_NBG) * scale_NBG, fraction_NBG * scale_NBG], dim=-1)
        return index_NBG2.flatten(2), weight_NBG2.flatten(2)


def sparse_roi_align(features_BCHW: Tensor, grids: RoIGrids) -> Tensor:
    """[N, C, P, Q]: RoIAlign (average of bilinear samples per bin) as a sparse [N·P·Q, B·H·W] matrix times
    the channels-last features."""
    images, channels, height, width = features_BCHW.shape
    bins_y, bins_x = grids.bins
    rois = grids.image_N.numel()
    if rois and not 0 <= int(grids.image_N.min()) <= int(grids.image_N.max()) < images:
        raise ValueError(f"RoIAlign: RoI image indices must lie in [0, {images}) for {images} feature maps")
    rows_y_NP, weights_y_NP = grids.axis_corners(0, height)
    columns_x_NQ, weights_x_NQ = grids.axis_corners(1, width)
    # entry (n, p, q, corner_y, corner_x): feature pixel (image, y, x), weight w_y·w_x
    column_NPQYX = (
        grids.image_N[:, None, None, None, None] * (height * width)
        + rows_y_NP[:, :, None, :, None] * width
        + columns_x_NQ[:, None, :, None, :]
    )
    weight_NPQYX = weights_y_NP[:, :, None, :, None] * weights_x_NQ[:, None, :, None, :]
    per_row = column_NPQYX.shape[-1] * column_NPQYX.shape[-2]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        weights_K = torch.sparse_csr_tensor(
            torch.arange(0, rois * bins_y * bins_x * per_row + 1, per_row, device=features_BCHW.device),
            column_NPQYX.reshape(-1),
            weight_NPQYX.reshape(-1).to(features_BCHW.dtype),
            (rois * bins_y * bins_x, images * height * width),
            check_invariants=False,  # the columns are in range by construction, and rows are evenly filled
        )
    pixels_XC = features_BCHW.permute(0, 2, 3, 1).reshape(images * height * width, channels)
    pooled_RC = weights_K @ pixels_XC
    return pooled_RC.view(rois, bins_y, bins_x, channels).permute(0, 3, 1, 2).contiguous()
