"""Model configs (plain dicts, as in an mmseg/mmdet config file) for UperNet and Mask R-CNN on an RMoE
backbone, sized by a stage's `HeadConfig`. The layouts follow mmseg's `upernet_swin` and mmdet's
`mask-rcnn_r50_fpn` base configs; the backbone and the data preprocessor come from the stage. The one
non-string type is Mask R-CNN's RoI layer, `mm.roi_align.RoIAlign` (mmdet looks RoI layer names up in
`mmcv.ops` only): mmcv's kernel, with a sparse product for small RoIs on CPU."""

from __future__ import annotations

from typing import Any

from rmoe_platform.config.stage import HeadConfig
from rmoe_platform.mm.roi_align import RoIAlign

PYRAMID_STRIDES = [4, 8, 16, 32]


def backbone_config(spec_fields: dict[str, Any], pyramid_channels: int | None) -> dict[str, Any]:
    """`RMoEViT` or `RMoESwinTransformer` for a trunk spec (arch, model_kwargs, moe, moe_layers)."""
    arch = spec_fields["arch"]
    config = {k: spec_fields[k] for k in ("arch", "model_kwargs", "moe", "moe_layers") if k in spec_fields}
    if "swin" in arch:
        return {"type": "RMoESwinTransformer", **config}
    return {"type": "RMoEViT", **config, "pyramid_channels": pyramid_channels}


def _norm(head: HeadConfig) -> dict[str, Any] | None:
    if head.norm == "none":
        return None
    if head.norm == "GN":
        return {"type": "GN", "num_groups": 32 if head.channels % 32 == 0 else 1, "requires_grad": True}
    return {"type": head.norm, "requires_grad": True}


def segmentation_model(
    backbone: dict[str, Any],
    in_channels: list[int],
    num_classes: int,
    head: HeadConfig,
    mean: list[float],
    std: list[float],
    size: int,
) -> dict[str, Any]:
    """UperNet (PPM + FPN decode head) with an FCN auxiliary head on the stride-16 map."""
    norm = _norm(head)
    model: dict[str, Any] = {
        "type": "RMoEEncoderDecoder",
        "data_preprocessor": {
            "type": "SegDataPreProcessor",
            "mean": mean,
            "std": std,
            "bgr_to_rgb": False,
            "pad_val": 0,
            "seg_pad_val": 255,
            "size": (size, size),
        },
        "backbone": backbone,
        "decode_head": {
            "type": "UPerHead",
            "in_channels": in_channels,
            "in_index": [0, 1, 2, 3],
            "pool_scales": (1, 2, 3, 6),
            "channels": head.channels,
            "dropout_ratio": 0.1,
            "num_classes": num_classes,
            "norm_cfg": norm,
            "align_corners": False,
            "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
        },
        "train_cfg": {},
        "test_cfg": {"mode": "whole"},
    }
    if head.aux_weight > 0:
        model["auxiliary_head"] = {
            "type": "FCNHead",
            "in_channels": in_channels[2],
            "in_index": 2,
            "channels": max(head.channels // 2, 1),
            "num_convs": 1,
            "concat_input": False,
            "dropout_ratio": 0.1,
            "num_classes": num_classes,
            "norm_cfg": norm,
            "align_corners": False,
            "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": head.aux_weight},
        }
    return model


def detection_model(
    backbone: dict[str, Any],
    in_channels: list[int],
    num_classes: int,
    head: HeadConfig,
    mean: list[float],
    std: list[float],
) -> dict[str, Any]:
    """Mask R-CNN: FPN (5 levels), RPN, shared-2FC box head and FCN mask head (`head.norm` in the FPN and
    the mask head's convolutions)."""
    width = head.channels
    return {
        "type": "RMoEMaskRCNN",
        "data_preprocessor": {
            "type": "DetDataPreprocessor",
            "mean": mean,
            "std": std,
            "bgr_to_rgb": False,
            "pad_mask": True,
            "pad_size_divisor": 32,
        },
        "backbone": backbone,
        "neck": {
            "type": "FPN",
            "in_channels": in_channels,
            "out_channels": width,
            "num_outs": 5,
            "norm_cfg": _norm(head),
        },
        "rpn_head": _rpn_head(width, head),
        "roi_head": _roi_head(width, num_classes, head),
        "train_cfg": _detection_train_cfg(head),
        "test_cfg": _detection_test_cfg(head),
    }


def _rpn_head(width: int, head: HeadConfig) -> dict[str, Any]:
    """Region proposals: 3 anchor ratios per FPN level (strides 4–64)."""
    return {
        "type": "RPNHead",
        "in_channels": width,
        "feat_channels": width,
        "anchor_generator": {
            "type": "AnchorGenerator",
            "scales": list(head.anchor_scales),
            "ratios": [0.5, 1.0, 2.0],
            "strides": [*PYRAMID_STRIDES, 64],
        },
        "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
        "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
        "loss_bbox": {"type": "L1Loss", "loss_weight": 1.0},
    }


def _roi_head(width: int, num_classes: int, head: HeadConfig) -> dict[str, Any]:
    """RoIAlign features into the shared-2FC box head and the FCN mask head."""
    return {
        "type": "StandardRoIHead",
        "bbox_roi_extractor": {
            "type": "SingleRoIExtractor",
            "roi_layer": {"type": RoIAlign, "output_size": 7, "sampling_ratio": 0},
            "out_channels": width,
            "featmap_strides": PYRAMID_STRIDES,
        },
        "bbox_head": {
            "type": "Shared2FCBBoxHead",
            "in_channels": width,
            "fc_out_channels": head.fc_channels,
            "roi_feat_size": 7,
            "num_classes": num_classes,
            "bbox_coder": {
                "type": "DeltaXYWHBBoxCoder",
                "target_means": [0.0] * 4,
                "target_stds": [0.1, 0.1, 0.2, 0.2],
            },
            "reg_class_agnostic": False,
            "loss_cls": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
            "loss_bbox": {"type": "L1Loss", "loss_weight": 1.0},
        },
        "mask_roi_extractor": {
            "type": "SingleRoIExtractor",
            "roi_layer": {"type": RoIAlign, "output_size": 14, "sampling_ratio": 0},
            "out_channels": width,
            "featmap_strides": PYRAMID_STRIDES,
        },
        "mask_head": {
            "type": "FCNMaskHead",
            "num_convs": 4,
            "in_channels": width,
            "conv_out_channels": width,
            "num_classes": num_classes,
            "norm_cfg": _norm(head),
            "loss_mask": {"type": "CrossEntropyLoss", "use_mask": True, "loss_weight": 1.0},
        },
    }


def _detection_train_cfg(head: HeadConfig) -> dict[str, Any]:
    """Anchor/proposal assignment and sampling in training (mmdet's Mask R-CNN 1x)."""
    return {
        "rpn": {
            "assigner": _assigner(0.7, 0.3, 0.3),
            "sampler": {
                "type": "RandomSampler",
                "num": 256,
                "pos_fraction": 0.5,
                "neg_pos_ub": -1,
                "add_gt_as_proposals": False,
            },
            "allowed_border": -1,
            "pos_weight": -1,
            "debug": False,
        },
        "rpn_proposal": {
            "nms_pre": 2 * head.rpn_proposals,
            "max_per_img": head.rpn_proposals,
            "nms": {"type": "nms", "iou_threshold": 0.7},
            "min_bbox_size": 0,
        },
        "rcnn": {
            "assigner": _assigner(0.5, 0.5, 0.5),
            "sampler": {
                "type": "RandomSampler",
                "num": head.roi_samples,
                "pos_fraction": 0.25,
                "neg_pos_ub": -1,
                "add_gt_as_proposals": True,
            },
            "mask_size": 28,
            "pos_weight": -1,
            "debug": False,
        },
    }


def _detection_test_cfg(head: HeadConfig) -> dict[str, Any]:
    """Proposals kept and detections returned at test time."""
    return {
        "rpn": {
            "nms_pre": head.rpn_proposals,
            "max_per_img": head.rpn_proposals,
            "nms": {"type": "nms", "iou_threshold": 0.7},
            "min_bbox_size": 0,
        },
        "rcnn": {
            "score_thr": head.score_thr,
            "nms": {"type": "nms", "iou_threshold": 0.5},
            "max_per_img": head.max_per_img,
            "mask_thr_binary": 0.5,
        },
    }


def _assigner(pos: float, neg: float, min_pos: float) -> dict[str, Any]:
    return {
        "type": "MaxIoUAssigner",
        "pos_iou_thr": pos,
        "neg_iou_thr": neg,
        "min_pos_iou": min_pos,
        "match_low_quality": True,
        "ignore_iof_thr": -1,
    }
