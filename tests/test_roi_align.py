"""`mm.roi_align.RoIAlign` is mmcv's RoIAlign on every input it takes the sparse product for (outputs and
gradients to the features, edge rules included), hands large-grid and non-fp32 inputs to mmcv's kernel,
and is what the Mask R-CNN heads are built with."""

from __future__ import annotations

import pytest
import torch
from mmcv.ops import roi_align as mmcv_roi_align

from rmoe_platform.mm import roi_align as roi_align_module
from rmoe_platform.mm.roi_align import MAX_SPARSE_GRID, RoIAlign, RoIGrids


def rois_across_edges(count: int, images: int, side: float, generator: torch.Generator) -> torch.Tensor:
    """RoIs of 0-45% of the side anywhere from before the image's origin to past its far edge, plus a
    zero-size and a fully outside one (mmcv's kernel refuses reversed ones)."""
    image = torch.randint(0, images, (count, 1), generator=generator).float()
    size = torch.rand(count, 2, generator=generator) * 0.45 * side
    corner = torch.rand(count, 2, generator=generator) * side * 1.3 - 0.15 * side
    special = torch.tensor([[0, 5.0, 5.0, 5.0, 5.0], [images - 1, side + 8, side + 8, side + 20, side + 30]])
    return torch.cat([torch.cat([image, corner, corner + size], 1), special])


def kernel_and_module(features: torch.Tensor, rois: torch.Tensor, module: RoIAlign) -> tuple[torch.Tensor, ...]:
    weights = None
    outputs, grads = [], []
    for run in (
        lambda: mmcv_roi_align(
            features, rois, module.output_size, module.spatial_scale, module.sampling_ratio, "avg", module.aligned
        ),
        lambda: module(features, rois),
    ):
        features.grad = None
        out = run()
        weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)) if weights is None else weights
        (out * weights).sum().backward()
        outputs.append(out.detach())
        grads.append(features.grad.clone())
    return outputs[0], outputs[1], grads[0], grads[1]


@pytest.mark.parametrize(
    ("bins", "scale", "sampling_ratio", "aligned"),
    [(7, 0.25, 0, True), (14, 0.25, 0, True), ((7, 5), 0.125, 0, True), (7, 0.25, 2, True), (7, 0.25, 0, False)],
)
def test_the_sparse_product_equals_mmcv_roi_align(bins, scale, sampling_ratio, aligned) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 8, 12, 10, generator=generator, requires_grad=True)
    rois = rois_across_edges(64, 3, 10 / scale, generator)
    module = RoIAlign(bins, scale, sampling_ratio, aligned=aligned)
    grids = RoIGrids.of(rois, module.output_size, scale, sampling_ratio, aligned)
    assert 1 <= grids.largest() <= MAX_SPARSE_GRID, "the case exercises the sparse path"
    expected, got, expected_grad, got_grad = kernel_and_module(features, rois, module)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_a_nan_roi_is_not_sampled_and_a_wrong_image_index_is_refused() -> None:
    features = torch.randn(2, 4, 8, 8)
    rois = torch.tensor([[0, float("nan"), 1.0, 9.0, 7.0], [1, 0.0, 2.0, 5.0, 12.0]])
    out = RoIAlign(7, 0.5)(features, rois)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"image indices must lie in \[0, 2\)"):
        RoIAlign(7, 0.5)(features, torch.tensor([[2, 0.0, 0.0, 4.0, 4.0]]))


def test_rois_get_no_gradient_and_empty_rois_give_an_empty_output() -> None:
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 7.0], [1, 0.0, 2.0, 5.0, 12.0]], requires_grad=True)
    module = RoIAlign(7, 0.5)
    module(features, rois).sum().backward()
    assert rois.grad is None and features.grad is not None
    assert module(features, torch.zeros(0, 5)).shape == (0, 4, 7, 7)


def test_large_grids_and_bf16_go_to_the_mmcv_kernel(monkeypatch) -> None:
    calls: list[str] = []
    sparse = roi_align_module.sparse_roi_align
    monkeypatch.setattr(roi_align_module, "sparse_roi_align", lambda *a: calls.append("sparse") or sparse(*a))
    features = torch.randn(1, 4, 32, 32)
    module = RoIAlign(7, 0.25)
    small = torch.tensor([[0, 4.0, 4.0, 60.0, 60.0]])  # 14 feature px over 7 bins: 2 samples per bin
    large = torch.tensor([[0, 4.0, 4.0, 124.0, 124.0]])  # 30 px: 5 samples per bin
    module(features, small)
    assert calls == ["sparse"]
    module(features, large)
    assert calls == ["sparse"], "the large RoI went to mmcv's kernel"
    with pytest.raises(RuntimeError):  # mmcv's kernel, as before, refuses bf16
        module(features.bfloat16(), small)
    assert calls == ["sparse"]


def test_mask_rcnn_heads_are_built_with_it() -> None:
    from rmoe import ModelSpec
    from rmoe_platform.config.stage import HeadConfig
    from rmoe_platform.mm.build import build_dense_model

    head = HeadConfig(channels=32, fc_channels=64, anchor_scales=(2, 4), rpn_proposals=32, roi_samples=16)
    spec = ModelSpec("rmoe_swin_nano_patch4_window4_64", {"img_size": 64})
    model = build_dense_model("detection", spec, 3, head, ((0.5,) * 3, (0.25,) * 3), 64)
    layers = [*model.roi_head.bbox_roi_extractor.roi_layers, *model.roi_head.mask_roi_extractor.roi_layers]
    assert layers and all(type(layer) is RoIAlign for layer in layers)
    assert [layer.output_size for layer in layers] == [(7, 7)] * 4 + [(14, 14)] * 4
